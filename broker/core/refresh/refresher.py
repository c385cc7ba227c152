"""Single-flight: one refresh task per link in this process, shared by every caller that needs it."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from uuid import UUID

from broker.core.refresh.locked import LockedRefresh
from broker.core.refresh.outcomes import failure_status, fallback
from broker.core.refresh.parts import RefreshParts
from broker.errors import BrokerError, RefreshLockTimeout, StoreUnavailable
from broker.model import Link, TokenResult, TokenStatus
from broker.telemetry.logs import UserLog

log = logging.getLogger("broker.refresh")


class Refresher:
    """One refresh per link at a time: callers in this process share one task (single-flight); the task does the
    locked refresh (LockedRefresh) that replicas serialise on. A caller waits for the shared task only until its own
    deadline; the task itself goes on (it is shielded), so a cancelled caller never cancels a refresh."""

    def __init__(self, parts: RefreshParts) -> None:
        self._idp = parts.idp
        self._settings = parts.settings
        self._writeback = parts.writeback
        self._liveness = parts.liveness
        self._rejected = parts.rejected
        self._obs = parts.observer
        self._clock = parts.clock
        self._locked = LockedRefresh(parts)
        self._flights: dict[UUID, asyncio.Task[TokenResult]] = {}
        self._slots = asyncio.Semaphore(max(1, parts.settings.max_concurrent))

    async def refresh(self, link: Link, deadline: float, *, rejected: bytes | None = None) -> TokenResult:
        """Join (or start) the one refresh of this link; wait for it until `deadline` (time.monotonic()).

        `rejected`: the SHA-256 of link's access token, which an upstream refused. The refresh is then forced (or
        any running one joined), and that token is never the answer: a failure answers "" with its status."""
        task = self._flight(link, rejected)
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            UserLog(log, link.user_id).info("refresh still running when the caller's budget ran out")
            result = fallback(link, TokenStatus.IDP_UNAVAILABLE, self._clock())
        if rejected is not None and result.access_token and result.access_token.sha256() == rejected:
            self._obs.forced_refresh("failed")
            return TokenResult.empty(result.failure or TokenStatus.IDP_UNAVAILABLE)
        return result

    def refusal(self) -> BrokerError | None:
        """Why no refresh could go out right now (no IdP, an open circuit), else None."""
        return self._idp.refusal()

    def refresh_ahead(self, link: Link) -> None:
        """Start a background refresh (if none runs) without waiting for it."""
        if self._idp.refusal() is None:
            self._flight(link)

    async def drain(self, timeout: float) -> None:
        """Shutdown: wait (bounded) for running refreshes, then give the write-back its last attempts."""
        started = time.monotonic()
        if self._flights:
            await asyncio.wait(list(self._flights.values()), timeout=timeout)
        await self._writeback.drain(max(timeout - (time.monotonic() - started), 1.0))
        await self._liveness.close()

    def _flight(self, link: Link, rejected: bytes | None = None) -> asyncio.Task[TokenResult]:
        task = self._flights.get(link.user_id)  # any running refresh replaces the rejected token as well
        if task is None:
            task = asyncio.create_task(self._run(link, rejected), name=f"refresh:{link.user_id}")
            self._flights[link.user_id] = task
            self._obs.inflight(+1)
            task.add_done_callback(functools.partial(self._landed, link.user_id))
        return task

    def _landed(self, user_id: UUID, task: asyncio.Task[TokenResult]) -> None:
        if self._flights.get(user_id) is task:
            del self._flights[user_id]
        self._obs.inflight(-1)

    async def _run(self, seen: Link, rejected: bytes | None) -> TokenResult:
        ulog = UserLog(log, seen.user_id)
        try:
            return await self._refresh(seen, rejected)
        except BrokerError as exc:
            ulog.warning("refresh not done: %s", exc)
            return fallback(seen, failure_status(exc), self._clock())
        except Exception:
            ulog.exception("refresh failed unexpectedly")
            return fallback(seen, TokenStatus.IDP_UNAVAILABLE, self._clock())

    async def _refresh(self, seen: Link, rejected: bytes | None) -> TokenResult:
        pending = self._writeback.reconcile(seen)
        if pending is not None and rejected is not None:
            # The upstream refused the token we hold in memory: land it, then refresh from the row.
            if not await self._writeback.land_now(seen.user_id):
                raise StoreUnavailable("rotated tokens not written back yet; not refreshing until they are")
            pending = None
        if pending is not None:
            # The row still holds the consumed refresh token. Never send it: serve ours, or land ours first.
            served = self._writeback.serve(pending)
            if served is not None:
                return served
            if not await self._writeback.land_now(seen.user_id):
                raise StoreUnavailable("rotated tokens not written back yet; not refreshing until they are")
        if seen.refresh_token in self._rejected:
            return fallback(seen, TokenStatus.REAUTH_REQUIRED, self._clock())
        refusal = self._idp.refusal()
        if refusal is not None:
            raise refusal
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._settings.lock_timeout)
        except TimeoutError:
            raise RefreshLockTimeout("too many refreshes queued in this process") from None
        try:
            return await self._locked.refresh(seen, rejected=rejected)
        finally:
            self._slots.release()
