"""The domain: what the broker decides, with no I/O of its own. It talks to the store and the IdP only through the
interfaces in `broker.core.interfaces`, and never imports grpc, asyncpg, httpx2 or cryptography (a test holds it to
that): the adapters live in `broker.postgres`, `broker.idp` and `broker.server`.

- `interfaces`: the ports (LinkStore, IdentityProvider, Gatekeeper, RefreshObserver);
- `policy`: pure refresh decisions;
- `tokens`: the use case (read, decide, serve or refresh);
- `circuit`: the IdP circuit breaker;
- `resources`, `exchange`: the resource policy, and tokens exchanged for one resource (RFC 8693);
- `refresh/`: the refresh core, one guarantee per module.

`build_domain()` wires it all around a store and an IdP; the composition root (`broker.app`) calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from broker.core.circuit import CircuitBreaker
from broker.core.exchange import ExchangeService, GuardedExchanger
from broker.core.interfaces import (
    ExchangeObserver,
    ExchangeStore,
    GuardedIdp,
    IdentityProvider,
    LinkStore,
    NullObserver,
    RefreshObserver,
    TokenExchanger,
)
from broker.core.refresh import Refresher, RefreshSettings
from broker.core.refresh.background import Activity, BackgroundRefresh
from broker.core.refresh.guarded import GuardedIdentityProvider, NullIdentityProvider
from broker.core.refresh.liveness import Liveness
from broker.core.refresh.parts import RefreshParts
from broker.core.refresh.rejections import RejectedTokens
from broker.core.refresh.schedule import BackgroundSettings, ScheduleStore
from broker.core.refresh.writeback import WriteBack
from broker.core.tokens import TokenService
from broker.errors import StoreUnavailable
from broker.model import RefreshedTokens, utcnow
from broker.telemetry.tracing import NULL_TRACER, Tracer

__all__ = [
    "BackgroundSettings",
    "CircuitSettings",
    "Domain",
    "ExchangeService",
    "RefreshSettings",
    "ScheduleStore",
    "TokenService",
    "build_domain",
]

log = logging.getLogger("broker.app")


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    failures: int
    """Consecutive IdP outages that open the circuit."""
    open_seconds: float
    """How long the circuit stays open before a probe."""


@dataclass(frozen=True)
class Domain:
    """The token use case and what the lifecycle needs of the refresh core."""

    tokens: TokenService
    refresher: Refresher
    writeback: WriteBack
    background: BackgroundRefresh | None = None
    """Refreshes active users' tokens before the product's own refresh window (None: off, or no IdP)."""
    exchange: ExchangeService | None = None
    """Tokens exchanged for one resource; None without an exchange store."""

    async def drain(self, timeout: float) -> None:
        """At shutdown: let refreshes in flight finish and give pending write-backs a last attempt."""
        await self.refresher.drain(timeout)

    def unpersisted(self) -> int:
        """Rotated tokens held in memory until their write-back succeeds."""
        return len(self.writeback)


def build_domain(
    settings: RefreshSettings,
    circuit: CircuitSettings,
    store: LinkStore,
    idp: IdentityProvider | None,
    observer: RefreshObserver,
    tracer: Tracer = NULL_TRACER,
    *,
    background: BackgroundSettings | None = None,
    schedule: ScheduleStore | None = None,
    on_foreign_rotation: Callable[[], None] = lambda: None,
    exchange_store: ExchangeStore | None = None,
    exchanger: TokenExchanger | None = None,
    exchange_observer: ExchangeObserver | None = None,
) -> Domain:
    """Wire the refresh core and the token use case around a store and an IdP (None: no IdP configured). No I/O.

    With `background` settings and a `schedule`, active users' tokens are refreshed in the background. With
    `exchange_store`, also the token exchange (`exchanger`, None: none possible) through the same circuit as the
    refresh grant."""
    bs = background if schedule is not None else None
    breaker = CircuitBreaker(
        circuit.failures, circuit.open_seconds, on_change=lambda st: observer.circuit_state(int(st))
    )
    guarded: GuardedIdp = NullIdentityProvider() if idp is None else GuardedIdentityProvider(idp, breaker, observer)
    liveness = Liveness(store, settings.heartbeat_interval)
    writeback = WriteBack(
        store,
        liveness,
        observer,
        store_timeout=settings.store_timeout,
        warn_after=settings.persist_warn_after,
        on_landed=_note_landed(schedule, bs, settings.store_timeout) if schedule is not None and bs else None,
    )
    parts = RefreshParts(
        store,
        guarded,
        settings,
        writeback,
        liveness,
        RejectedTokens(settings.reauth_backoff),
        observer,
        tracer=tracer,
        background=bs,
    )
    refresher = Refresher(parts)
    activity = Activity(bs) if bs is not None else None
    tokens = TokenService(store, refresher, writeback, settings, observer=observer, tracer=tracer, activity=activity)
    runner = None
    if bs is not None and schedule is not None and activity is not None:
        runner = BackgroundRefresh(
            bs,
            schedule,
            store,
            refresher,
            activity,
            store_timeout=settings.store_timeout,
            lifetime=tokens.lifetime,
            on_foreign=on_foreign_rotation,
        )
    exchange = None
    if exchange_store is not None:
        watcher = exchange_observer or NullObserver()
        guarded_exchanger = None if exchanger is None else GuardedExchanger(exchanger, breaker, watcher, tracer)
        exchange = ExchangeService(tokens, exchange_store, guarded_exchanger, settings, observer=watcher, tracer=tracer)
    return Domain(tokens, refresher, writeback, runner, exchange)


def _note_landed(
    schedule: ScheduleStore, bs: BackgroundSettings, timeout: float
) -> Callable[[UUID, RefreshedTokens], Awaitable[None]]:
    """A write-back that landed outside the lock records its refresh token too (else it would count as foreign)."""

    async def landed(user_id: UUID, tokens: RefreshedTokens) -> None:
        try:
            await schedule.note_written(bs.written(user_id, tokens, utcnow()), timeout=timeout)
        except StoreUnavailable as exc:
            log.debug("written refresh token not recorded: %s", exc)

    return landed
