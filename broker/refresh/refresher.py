"""Single-flight and the locked refresh of one link: the only place a refresh token is sent to the IdP."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol
from uuid import UUID

from broker.errors import (
    BrokerError,
    IdpNotConfigured,
    IdpOutcomeUnknown,
    IdpRejected,
    IdpUnavailable,
    RefreshInFlight,
    RefreshLockTimeout,
    StoreUnavailable,
)
from broker.model import AccountState, Link, RefreshedTokens, Secret, TokenResult, TokenStatus, utcnow
from broker.policy import is_expired, needs_refresh
from broker.ports import IdentityProvider, LinkStore, LockedLink, RefreshObserver
from broker.refresh.liveness import Liveness
from broker.refresh.rejections import RejectedTokens
from broker.refresh.settings import RefreshSettings
from broker.refresh.writeback import Pending, WriteBack

log = logging.getLogger("broker.refresh")


class GuardedIdp(IdentityProvider, Protocol):
    """An IdentityProvider that can tell, without a call, that it would refuse one (an open circuit, no IdP)."""

    def refusal(self) -> BrokerError | None:
        """The error a call would end with right now, or None when a call may go out."""
        ...


#: What a failed refresh answers (with the stored token instead, while it has not expired). Looked up along the
#: exception's class hierarchy, so IdpOutcomeUnknown answers as IdpUnavailable.
FAILURE_STATUS: dict[type[BrokerError], TokenStatus] = {
    IdpNotConfigured: TokenStatus.EXPIRED,
    IdpRejected: TokenStatus.REAUTH_REQUIRED,
    IdpUnavailable: TokenStatus.IDP_UNAVAILABLE,
    RefreshLockTimeout: TokenStatus.IDP_UNAVAILABLE,
    RefreshInFlight: TokenStatus.IDP_UNAVAILABLE,
    StoreUnavailable: TokenStatus.STORE_UNAVAILABLE,
}


def failure_status(exc: BaseException) -> TokenStatus:
    for cls in type(exc).__mro__:
        status = FAILURE_STATUS.get(cls)
        if status is not None:
            return status
    return TokenStatus.IDP_UNAVAILABLE  # a bug: logged with its traceback by the caller


def fallback(link: Link, status: TokenStatus, now: datetime) -> TokenResult:
    """After a failed refresh: the stored token if it has not actually expired (VALID), else "" with `status`."""
    if not is_expired(link, now):
        return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
    return TokenResult.empty(status)


def refreshed(tokens: RefreshedTokens) -> TokenResult:
    return TokenResult(TokenStatus.REFRESHED, tokens.access_token, tokens.expiry, refreshed=True)


class Refresher:
    """One refresh per link at a time: callers in this process share one task (single-flight); replicas share the
    row lock and the in-flight marker. A caller waits for the shared task only as long as its own deadline."""

    def __init__(
        self,
        store: LinkStore,
        idp: GuardedIdp,
        settings: RefreshSettings,
        *,
        writeback: WriteBack,
        liveness: Liveness,
        rejected: RejectedTokens,
        observer: RefreshObserver,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._idp = idp
        self._settings = settings
        self._writeback = writeback
        self._liveness = liveness
        self._rejected = rejected
        self._obs = observer
        self._clock = clock
        self._flights: dict[UUID, asyncio.Task[TokenResult]] = {}
        self._slots = asyncio.Semaphore(max(1, settings.max_concurrent))

    # -- what callers use -------------------------------------------------------------------------------------

    async def refresh(self, link: Link, deadline: float) -> TokenResult:
        """Join (or start) the one refresh of this link; wait for it until `deadline` (time.monotonic())."""
        task = self._flight(link)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            log.info("refresh still running when the caller's budget ran out", extra={"user_id": str(link.user_id)})
            return fallback(link, TokenStatus.IDP_UNAVAILABLE, self._clock())

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

    async def _run(self, seen: Link) -> TokenResult:
        try:
            return await self._refresh(seen)
        except BrokerError as exc:
            log.warning("refresh not done: %s", exc, extra={"user_id": str(seen.user_id)})
            return fallback(seen, failure_status(exc), self._clock())
        except Exception:
            log.exception("refresh failed unexpectedly", extra={"user_id": str(seen.user_id)})
            return fallback(seen, TokenStatus.IDP_UNAVAILABLE, self._clock())

    async def _refresh(self, seen: Link) -> TokenResult:
        pending = self._writeback.reconcile(seen)
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
            return await self._locked_refresh(seen, retry_on_rotation=True)
        finally:
            self._slots.release()

    async def _locked_refresh(self, seen: Link, *, retry_on_rotation: bool) -> TokenResult:
        uid = seen.user_id
        tokens: RefreshedTokens | None = None
        used = seen.refresh_token
        waited_from = time.monotonic()
        s = self._settings
        try:
            async with self._store.lock_link(uid, lock_timeout=s.lock_timeout, hold_timeout=s.hold_timeout) as locked:
                self._obs.lock_waited(time.monotonic() - waited_from)
                link = locked.link
                early = self._answer_without_idp(seen, link)
                if early is not None:
                    return early
                assert link is not None
                used = link.refresh_token
                tokens = await self._send(locked, link)
                # From here on the IdP has rotated the refresh token: the new one must not be lost.
                if not await locked.save(tokens):
                    log.warning("refreshed link vanished under the lock", extra={"user_id": str(uid)})
            self._liveness.release(uid, used)
            return refreshed(tokens)
        except IdpRejected as rejection:
            return await self._after_rejection(seen, used, rejection, retry_on_rotation=retry_on_rotation)
        except BaseException as exc:
            if tokens is None:
                raise
            # The write or the commit failed (or timed out) after the IdP answered: keep and retry. Compare-and-set
            # makes a retry after an unseen commit a no-op.
            self._writeback.hold(uid, Pending(used, tokens))
            if not isinstance(exc, Exception):
                raise
            log.warning("write-back of rotated tokens failed (%s); retrying", exc, extra={"user_id": str(uid)})
            return refreshed(tokens)

    def _answer_without_idp(self, seen: Link, link: Link | None) -> TokenResult | None:
        """Under the lock, before any IdP call: the answers that need none. Raises RefreshInFlight when a live
        holder elsewhere has this very refresh token at the IdP."""
        if link is None:
            return TokenResult.empty(TokenStatus.NO_LINK)
        if link.account is AccountState.DISABLED:
            return TokenResult.empty(TokenStatus.ACCOUNT_DISABLED)
        now = self._clock()
        changed = link.refresh_token != seen.refresh_token or link.access_token != seen.access_token
        if changed and not needs_refresh(link, now, self._settings.leeway):
            # Another caller or replica refreshed while we waited for the lock: use its token.
            return TokenResult(TokenStatus.REFRESHED, link.access_token, link.expiry, refreshed=True)
        if not link.refresh_token:
            return fallback(link, TokenStatus.EXPIRED, now)
        if link.refresh_token in self._rejected:
            return fallback(link, TokenStatus.REAUTH_REQUIRED, now)
        idle = link.marker_idle_seconds
        if idle is not None:
            if idle < self._settings.holder_dead_after:
                raise RefreshInFlight("refresh token already at the IdP from a live holder; not sending it again")
            log.warning(
                "the holder of this refresh token's in-flight marker is gone (no heartbeat for %.1fs); taking it "
                "over and sending the token once",
                idle,
                extra={"user_id": str(link.user_id)},
            )
        return None

    async def _send(self, locked: LockedLink, link: Link) -> RefreshedTokens:
        """Mark the token in flight (with a live heartbeat), send it, and settle the marker by the outcome."""
        uid, used = link.user_id, link.refresh_token
        await locked.mark_in_flight()
        self._liveness.hold(uid, used)
        try:
            return await self._idp.refresh(used)
        except IdpOutcomeUnknown:
            # It may have rotated: the marker stays and dies with its heartbeat, then one replica sends once.
            self._liveness.release(uid, used)
            raise
        except (IdpUnavailable, IdpRejected, IdpNotConfigured):
            # The IdP said it did not rotate: lift the marker.
            self._liveness.release(uid, used)
            await locked.clear_in_flight()
            raise
        except BaseException:
            self._liveness.release(uid, used)  # unknown outcome: as above, the marker stays
            raise

    async def _after_rejection(
        self, seen: Link, used: Secret, rejection: IdpRejected, *, retry_on_rotation: bool
    ) -> TokenResult:
        uid = seen.user_id
        try:
            latest = await self._store.get_link(uid, timeout=self._settings.store_timeout)
        except StoreUnavailable:
            latest = None  # cannot tell whether it was rotated meanwhile; the rejection stands
        if latest is not None and latest.refresh_token and latest.refresh_token != used:
            log.info("refresh token was rotated meanwhile; using the new state", extra={"user_id": str(uid)})
            if retry_on_rotation and needs_refresh(latest, self._clock(), self._settings.leeway):
                return await self._locked_refresh(latest, retry_on_rotation=False)
            return fallback(latest, TokenStatus.REAUTH_REQUIRED, self._clock())
        self._rejected.remember(used)
        log.warning(
            "identity provider rejected the refresh (%s); not retrying this refresh token for %ss",
            rejection.error,
            self._settings.reauth_backoff,
            extra={"user_id": str(uid)},
        )
        return fallback(latest or seen, TokenStatus.REAUTH_REQUIRED, self._clock())
