"""The single-flight refresher: one refresh per link across callers (in-process) and replicas (PostgreSQL row lock).

Guarantees, in order of importance:
- a refresh token is sent to the IdP by at most one caller at a time, across every replica sharing the database;
- once the IdP has answered, the rotated tokens are never dropped: they are written in the locked transaction,
  else retried with backoff on fresh connections, else kept in memory (served and retried on the next request);
- a caller that cancels or times out abandons only its own wait, never the refresh;
- a refresh token the IdP rejected is not sent again for `reauth_backoff`;
- during an IdP outage the circuit breaker answers fast.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from broker.circuit import CircuitBreaker, CircuitState
from broker.errors import (
    IdpNotConfigured,
    IdpRejected,
    IdpUnavailable,
    RefreshLockTimeout,
    StoreUnavailable,
)
from broker.model import AccountState, Link, RefreshedTokens, Secret, TokenResult, TokenStatus
from broker.policy import is_expired, needs_refresh
from broker.ports import IdentityProvider, LinkStore, NullObserver, RefreshObserver

log = logging.getLogger("broker.refresher")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    leeway: timedelta
    lock_timeout: float
    reauth_backoff: float
    persist_retry_seconds: float
    store_timeout: float
    max_concurrent: int
    in_flight_window: float = 60.0  # how long another replica's unwritten refresh blocks sending the same token


@dataclass(slots=True)
class _Pending:
    """Refreshed tokens the IdP issued that are not yet in the database."""

    previous_refresh: Secret
    tokens: RefreshedTokens
    retrying: bool = False


def fallback(link: Link, status: TokenStatus, now: datetime) -> TokenResult:
    """After a failed refresh: the stored token if it has not actually expired (VALID), else "" with `status`."""
    if not is_expired(link, now):
        return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
    return TokenResult.empty(status)


class Refresher:
    def __init__(
        self,
        store: LinkStore,
        idp: IdentityProvider | None,
        settings: RefreshSettings,
        circuit: CircuitBreaker,
        observer: RefreshObserver | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._idp = idp
        self._s = settings
        self._circuit = circuit
        self._obs = observer or NullObserver()
        self._clock = clock
        self._flights: dict[UUID, asyncio.Task[TokenResult]] = {}
        self._pending: dict[UUID, _Pending] = {}
        self._dead: dict[Secret, float] = {}  # rejected refresh token -> monotonic time until which it is not sent
        self._background: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max(1, settings.max_concurrent))

    # -- what callers use -------------------------------------------------------------------------------------

    async def refresh(self, link: Link, budget: float) -> TokenResult:
        """Join (or start) the one refresh of this link and wait for it at most `budget` seconds."""
        task = self._flight(link)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=max(budget, 0.0))
        except TimeoutError:
            log.info("refresh still running when the caller's budget ran out", extra={"user_id": str(link.user_id)})
            return fallback(link, TokenStatus.IDP_UNAVAILABLE, self._clock())

    def refresh_ahead(self, link: Link) -> None:
        """Start a background refresh (if none runs) without waiting for it."""
        self._flight(link)

    def pending_result(self, user_id: UUID) -> TokenResult | None:
        """Refreshed tokens not yet persisted, served while the database is unavailable."""
        p = self._pending.get(user_id)
        if p is None or (p.tokens.expiry is not None and p.tokens.expiry <= self._clock()):
            return None
        return TokenResult(TokenStatus.REFRESHED, p.tokens.access_token, p.tokens.expiry, refreshed=True)

    @property
    def unpersisted(self) -> int:
        return len(self._pending)

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for running refreshes and write-back retries, e.g. at shutdown."""
        tasks: list[asyncio.Task[object]] = [*self._flights.values(), *self._background]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self._pending:
            log.error(
                "shutting down with refreshed tokens that could not be written back",
                extra={"user_ids": [str(u) for u in self._pending]},
            )

    # -- the flight -------------------------------------------------------------------------------------------

    def _flight(self, link: Link) -> asyncio.Task[TokenResult]:
        task = self._flights.get(link.user_id)
        if task is None:
            task = asyncio.create_task(self._run(link), name=f"refresh:{link.user_id}")
            self._flights[link.user_id] = task
            self._obs.inflight(+1)
            task.add_done_callback(functools.partial(self._landed, link.user_id))
        return task

    def _landed(self, user_id: UUID, task: asyncio.Task[TokenResult]) -> None:
        if self._flights.get(user_id) is task:
            del self._flights[user_id]
        self._obs.inflight(-1)
        if not task.cancelled() and task.exception() is not None:
            log.error("refresh crashed", exc_info=task.exception(), extra={"user_id": str(user_id)})

    async def _run(self, seen: Link) -> TokenResult:
        try:
            return await self._refresh(seen, retry_on_rotation=True)
        except IdpNotConfigured:
            return fallback(seen, TokenStatus.EXPIRED, self._clock())
        except (IdpUnavailable, RefreshLockTimeout) as exc:
            log.warning("refresh not done: %s", exc, extra={"user_id": str(seen.user_id)})
            return fallback(seen, TokenStatus.IDP_UNAVAILABLE, self._clock())
        except StoreUnavailable as exc:
            log.warning("refresh not done: %s", exc, extra={"user_id": str(seen.user_id)})
            return fallback(seen, TokenStatus.STORE_UNAVAILABLE, self._clock())
        except Exception:
            log.exception("refresh failed unexpectedly", extra={"user_id": str(seen.user_id)})
            return fallback(seen, TokenStatus.IDP_UNAVAILABLE, self._clock())

    async def _refresh(self, seen: Link, *, retry_on_rotation: bool) -> TokenResult:
        uid = seen.user_id
        pending = self._pending.get(uid)
        if pending is not None:
            # The row is stale: its refresh token was already consumed. Never send it; serve and persist ours.
            self._persist_later(uid, pending)
            result = self.pending_result(uid)
            if result is not None:
                return result
        if self._idp is None:
            raise IdpNotConfigured("no identity provider configured")
        if self._is_dead(seen.refresh_token):
            return fallback(seen, TokenStatus.REAUTH_REQUIRED, self._clock())
        if self._circuit.state is CircuitState.OPEN:
            raise IdpUnavailable("identity provider circuit is open")

        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._s.lock_timeout)
        except TimeoutError:
            raise RefreshLockTimeout("too many refreshes queued in this process") from None
        try:
            return await self._locked_refresh(seen, retry_on_rotation=retry_on_rotation)
        finally:
            self._slots.release()

    async def _locked_refresh(self, seen: Link, *, retry_on_rotation: bool) -> TokenResult:
        uid = seen.user_id
        tokens: RefreshedTokens | None = None
        used = seen.refresh_token
        waited_from = time.monotonic()
        try:
            async with self._store.lock_link(uid, lock_timeout=self._s.lock_timeout) as locked:
                self._obs.lock_waited(time.monotonic() - waited_from)
                link = locked.link
                if link is None:
                    return TokenResult.empty(TokenStatus.NO_LINK)
                if link.account is AccountState.DISABLED:
                    return TokenResult.empty(TokenStatus.ACCOUNT_DISABLED)
                now = self._clock()
                changed = link.refresh_token != seen.refresh_token or link.access_token != seen.access_token
                if changed and not needs_refresh(link, now, self._s.leeway):
                    # Another caller or replica refreshed while we waited for the lock: use its token.
                    return TokenResult(TokenStatus.REFRESHED, link.access_token, link.expiry, refreshed=True)
                used = link.refresh_token
                if self._is_dead(used):
                    return fallback(link, TokenStatus.REAUTH_REQUIRED, now)
                if link.in_flight_seconds is not None and link.in_flight_seconds < self._s.in_flight_window:
                    # Another replica sent this very refresh token and lost its connection before writing the
                    # answer; sending it again could revoke the grant. Its write-back retry will land the result.
                    log.warning(
                        "refresh token already at the IdP from another replica; not sending it again",
                        extra={"user_id": str(uid)},
                    )
                    return fallback(link, TokenStatus.IDP_UNAVAILABLE, now)
                await locked.mark_in_flight()
                try:
                    tokens = await self._call_idp(used)
                except (IdpUnavailable, IdpRejected):
                    await locked.clear_in_flight()
                    raise
                # From here on the IdP has rotated the refresh token: the new one must not be lost.
                if not await locked.save(tokens):
                    log.warning("refreshed link vanished under the lock", extra={"user_id": str(uid)})
            return TokenResult(TokenStatus.REFRESHED, tokens.access_token, tokens.expiry, refreshed=True)
        except StoreUnavailable:
            if tokens is None:
                raise
            log.warning("write-back of refreshed tokens failed; retrying", extra={"user_id": str(uid)})
            self._persist_later(uid, _Pending(used, tokens))
            return TokenResult(TokenStatus.REFRESHED, tokens.access_token, tokens.expiry, refreshed=True)
        except IdpRejected as rejected:
            return await self._after_rejection(seen, used, rejected, retry_on_rotation=retry_on_rotation)

    async def _after_rejection(
        self, seen: Link, used: Secret, rejected: IdpRejected, *, retry_on_rotation: bool
    ) -> TokenResult:
        uid = seen.user_id
        try:
            latest = await self._store.get_link(uid, timeout=self._s.store_timeout)
        except StoreUnavailable:
            latest = None  # cannot tell whether it was rotated meanwhile; the rejection stands
        if latest is not None and latest.refresh_token and latest.refresh_token != used:
            log.info("refresh token was rotated meanwhile; using the new state", extra={"user_id": str(uid)})
            if retry_on_rotation and needs_refresh(latest, self._clock(), self._s.leeway):
                return await self._locked_refresh(latest, retry_on_rotation=False)
            return fallback(latest, TokenStatus.REAUTH_REQUIRED, self._clock())
        self._remember_dead(used)
        log.warning(
            "identity provider rejected the refresh (%s); not retrying this refresh token for %ss",
            rejected.error,
            self._s.reauth_backoff,
            extra={"user_id": str(uid)},
        )
        return fallback(latest or seen, TokenStatus.REAUTH_REQUIRED, self._clock())

    async def _call_idp(self, refresh_token: Secret) -> RefreshedTokens:
        assert self._idp is not None
        self._circuit.before_call()
        started = time.monotonic()
        try:
            tokens = await self._idp.refresh(refresh_token)
        except IdpUnavailable:
            self._circuit.record_failure()
            self._obs.refresh_finished("idp_unavailable", time.monotonic() - started)
            raise
        except IdpRejected as exc:
            self._circuit.record_success()  # the IdP is up; it said no
            self._obs.refresh_finished(
                "rejected" if exc.error != "invalid_grant" else "invalid_grant", time.monotonic() - started
            )
            raise
        self._circuit.record_success()
        self._obs.refresh_finished("success", time.monotonic() - started)
        return tokens

    def _remember_dead(self, refresh_token: Secret) -> None:
        now = time.monotonic()
        if len(self._dead) >= 10_000:  # bounded memory: drop entries whose back-off has passed
            self._dead = {k: v for k, v in self._dead.items() if v > now}
        self._dead[refresh_token] = now + self._s.reauth_backoff

    def _is_dead(self, refresh_token: Secret) -> bool:
        until = self._dead.get(refresh_token)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._dead[refresh_token]
            return False
        return True

    # -- write-back that survives -----------------------------------------------------------------------------

    def _persist_later(self, user_id: UUID, pending: _Pending) -> None:
        current = self._pending.get(user_id)
        if current is not None and current.retrying:
            return
        self._pending[user_id] = pending
        pending.retrying = True
        task = asyncio.create_task(self._persist_with_retry(user_id, pending), name=f"persist:{user_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _persist_with_retry(self, user_id: UUID, pending: _Pending) -> None:
        deadline = time.monotonic() + self._s.persist_retry_seconds
        delay = 0.05
        try:
            while True:
                try:
                    ok = await self._store.save_refreshed(
                        user_id, pending.previous_refresh, pending.tokens, timeout=self._s.store_timeout
                    )
                except StoreUnavailable as exc:
                    if time.monotonic() + delay >= deadline:
                        self._obs.persist_failed()
                        log.error(
                            "could not write back refreshed tokens after %ss (%s); kept in memory and retried on "
                            "the next request for this user",
                            self._s.persist_retry_seconds,
                            exc,
                            extra={"user_id": str(user_id)},
                        )
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if not ok:
                    log.warning(
                        "refreshed tokens not written: the link changed meanwhile (new login)",
                        extra={"user_id": str(user_id)},
                    )
                else:
                    log.info("refreshed tokens written back after retry", extra={"user_id": str(user_id)})
                if self._pending.get(user_id) is pending:
                    del self._pending[user_id]
                return
        finally:
            pending.retrying = False
