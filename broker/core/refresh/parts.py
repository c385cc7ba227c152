"""What the refresh core's classes share, built once by the composition root."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from broker.core.interfaces import GuardedIdp, LinkStore, RefreshObserver
from broker.core.refresh.liveness import Liveness
from broker.core.refresh.rejections import RejectedTokens
from broker.core.refresh.schedule import BackgroundSettings
from broker.core.refresh.settings import RefreshSettings
from broker.core.refresh.writeback import WriteBack
from broker.model import utcnow
from broker.telemetry.tracing import NULL_TRACER, Tracer


@dataclass(frozen=True)
class RefreshParts:
    store: LinkStore
    idp: GuardedIdp
    settings: RefreshSettings
    writeback: WriteBack
    liveness: Liveness
    rejected: RejectedTokens
    observer: RefreshObserver
    clock: Callable[[], datetime] = field(default=utcnow)
    tracer: Tracer = field(default=NULL_TRACER)
    background: BackgroundSettings | None = None  # on: every write also records the new refresh token's hash
