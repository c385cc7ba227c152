"""The memory of rejections: refresh tokens the IdP rejected, so that a dead token is not sent again on every request
(in this process); access tokens an upstream rejected, so that no worker or replica serves one again (in the
database)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from uuid import UUID

from broker.core.interfaces import LinkStore
from broker.errors import StoreUnavailable
from broker.model import Secret
from broker.telemetry.logs import UserLog

log = logging.getLogger("broker.refresh")


class RejectedTokens:
    """Refresh tokens rejected with invalid_grant (or invalid_client ...), each remembered for `backoff` seconds.

    Bounded: past `limit` entries, the ones whose back-off has passed are dropped first."""

    def __init__(self, backoff: float, *, clock: Callable[[], float] = time.monotonic, limit: int = 10_000) -> None:
        self._backoff = backoff
        self._clock = clock
        self._limit = limit
        self._until: dict[Secret, float] = {}

    def remember(self, refresh_token: Secret) -> None:
        now = self._clock()
        if len(self._until) >= self._limit:
            self._until = {k: v for k, v in self._until.items() if v > now}
            while len(self._until) >= self._limit:  # all still live: forget the one that ends first
                del self._until[min(self._until, key=self._until.__getitem__)]
        self._until[refresh_token] = now + self._backoff

    def __contains__(self, refresh_token: object) -> bool:
        if not isinstance(refresh_token, Secret):
            return False
        until = self._until.get(refresh_token)
        if until is None:
            return False
        if self._clock() >= until:
            del self._until[refresh_token]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


class RejectedAccessTokens:
    """Writes "an upstream rejected this access token" to the store (LinkStore.remember_rejected), where every read
    of every worker and replica sees it until the link holds another token. Callers reporting the same token at once
    share one write."""

    def __init__(self, store: LinkStore) -> None:
        self._store = store
        self._writes: dict[tuple[UUID, bytes], asyncio.Task[None]] = {}

    async def remember(self, user_id: UUID, access_sha256: bytes, *, timeout: float) -> bool:
        """Store the rejection within `timeout`; False (logged) when the store failed. The caller answers no token
        either way; only other callers would miss the rejection."""
        key = (user_id, access_sha256)
        task = self._writes.get(key)
        if task is None:
            task = asyncio.create_task(
                self._store.remember_rejected(user_id, access_sha256, timeout=timeout), name=f"rejected:{user_id}"
            )
            self._writes[key] = task
            task.add_done_callback(lambda done: self._written(key, done))
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=max(timeout, 0.0))
        except (StoreUnavailable, TimeoutError) as exc:
            UserLog(log, user_id).warning(
                "the upstream's rejection of the access token could not be stored (%s); other workers may serve it "
                "until it is replaced",
                str(exc) or "timed out",
            )
            return False
        return True

    def _written(self, key: tuple[UUID, bytes], task: asyncio.Task[None]) -> None:
        if self._writes.get(key) is task:
            del self._writes[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up already
