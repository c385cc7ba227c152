"""The locked refresh of one link: the only place a refresh token is sent to the IdP."""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack

from broker.core.interfaces import LockedLink
from broker.core.policy import is_expired, needs_refresh
from broker.core.refresh.outcomes import fallback, refreshed
from broker.core.refresh.parts import RefreshParts
from broker.core.refresh.writeback import Pending
from broker.errors import (
    IdpNotConfigured,
    IdpOutcomeUnknown,
    IdpRejected,
    IdpUnavailable,
    RefreshInFlight,
    StoreUnavailable,
)
from broker.model import (
    REAUTH_REQUIRED,
    RECOVERED,
    AccountState,
    Link,
    RefreshedTokens,
    Secret,
    TokenResult,
    TokenStatus,
)
from broker.telemetry.logs import UserLog

log = logging.getLogger("broker.refresh")


class LockedRefresh:
    """Under the link's row lock (shared by every replica): re-read, decide whether the IdP is needed at all, mark the
    token in flight with a live heartbeat, send it, and write the rotated tokens in the same transaction, or hand
    them to the write-back when that fails. A rejection re-reads the row before it stands."""

    def __init__(self, parts: RefreshParts) -> None:
        self._store = parts.store
        self._idp = parts.idp
        self._settings = parts.settings
        self._writeback = parts.writeback
        self._liveness = parts.liveness
        self._rejected = parts.rejected
        self._obs = parts.observer
        self._clock = parts.clock
        self._tracer = parts.tracer
        self._background = parts.background

    async def refresh(self, seen: Link, *, rejected: bytes | None = None) -> TokenResult:
        """Refresh `seen` (the row as the caller read it), or answer without the IdP when that is right. `rejected`:
        an upstream refused the access token with this SHA-256, so while the row still holds it, it is refreshed
        whatever its expiry (once per link per `forced_interval`, across replicas)."""
        return await self._locked_refresh(seen, retry_on_rotation=True, rejected=rejected)

    async def _locked_refresh(
        self, seen: Link, *, retry_on_rotation: bool, rejected: bytes | None = None
    ) -> TokenResult:
        uid = seen.user_id
        tokens: RefreshedTokens | None = None
        used = seen.refresh_token
        sent_from = seen
        waited_from = time.monotonic()
        s = self._settings
        rejection: IdpRejected | None = None
        events: list[str] = []  # written in the locked transaction: counted once it committed
        try:
            async with AsyncExitStack() as held:
                with self._tracer.span("refresh.lock_wait"):
                    locked = await held.enter_async_context(
                        self._store.lock_link(uid, lock_timeout=s.lock_timeout, hold_timeout=s.hold_timeout)
                    )
                self._obs.lock_waited(time.monotonic() - waited_from)
                link = locked.link
                # Forced: the row still holds the access token an upstream rejected.
                forced = rejected is not None and link is not None and link.access_token.sha256() == rejected
                early = self._answer_without_idp(seen, link, reported=rejected is not None, forced=forced)
                if early is not None:
                    return early
                assert link is not None
                used = link.refresh_token
                sent_from = link
                try:
                    tokens = await self._send(locked, link)
                except IdpRejected as exc:
                    # Confirmed under the row lock: the link's current refresh token is dead. The state and its
                    # event commit with this transaction (invalid_client and the like are the operator's: nothing).
                    rejection = exc
                    if exc.error == "invalid_grant" and await locked.note_reauth_required(exc.error, forced=forced):
                        events.append(REAUTH_REQUIRED)
                else:
                    # From here on the IdP has rotated the refresh token: the new one must not be lost.
                    with self._tracer.span("db.write_back"):
                        if not await locked.save(tokens):
                            UserLog(log, uid).warning("refreshed link vanished under the lock")
                        if forced:
                            await locked.note_forced()
                        if self._background is not None:
                            await locked.note_written(self._background.written(uid, tokens, self._clock()))
                        if link.reauth_fingerprint is not None and await locked.note_recovered(
                            link.reauth_fingerprint, "refresh"
                        ):
                            events.append(RECOVERED)
            for event in events:
                self._obs.link_event(event)
            if rejection is not None:
                raise rejection
            assert tokens is not None
            self._liveness.release(uid, used)
            if rejected is not None:
                self._obs.forced_refresh("refreshed")
            return refreshed(tokens)
        except IdpRejected as rejection:
            return await self._after_rejection(seen, used, rejection, retry_on_rotation=retry_on_rotation)
        except BaseException as exc:
            if rejection is not None and isinstance(exc, StoreUnavailable):
                # The rejection stands; only its record did not commit (a later request records it).
                UserLog(log, uid).warning("re-auth-required state not recorded: %s", exc)
                return await self._after_rejection(seen, used, rejection, retry_on_rotation=retry_on_rotation)
            if tokens is None:
                raise
            # The write or the commit failed (or timed out) after the IdP answered: keep and retry. Compare-and-set
            # makes a retry after an unseen commit a no-op.
            self._writeback.hold(uid, Pending(sent_from, tokens))
            if not isinstance(exc, Exception):
                raise
            UserLog(log, uid).warning("write-back of rotated tokens failed (%s); retrying", exc)
            return refreshed(tokens)

    def _answer_without_idp(self, seen: Link, link: Link | None, *, reported: bool, forced: bool) -> TokenResult | None:
        """Under the lock, before any IdP call: the answers that need none. Raises RefreshInFlight when a live
        holder elsewhere has this very refresh token at the IdP."""
        if link is None:
            return TokenResult.empty(TokenStatus.NO_LINK)
        if link.account is AccountState.DISABLED:
            return TokenResult.empty(TokenStatus.ACCOUNT_DISABLED)
        now = self._clock()
        if link.known_dead:
            # Recorded as needing a new login (by whoever held this lock before us): never sent again.
            if forced:
                return TokenResult.empty(TokenStatus.REAUTH_REQUIRED)
            return fallback(link, TokenStatus.REAUTH_REQUIRED, now)
        changed = link.refresh_token != seen.refresh_token or link.access_token != seen.access_token
        if reported and not forced:
            changed = True  # the rejected token is gone already
        if changed and not forced and not is_expired(link, now):
            # Another caller or replica refreshed (or the user logged in) while we waited for the lock: its token is
            # as fresh as a refresh of ours would be, whatever its lifetime. Use it.
            if reported:
                self._obs.forced_refresh("replaced")
            return TokenResult(TokenStatus.REFRESHED, link.access_token, link.expiry, refreshed=True)
        if forced and not link.refresh_token:
            self._obs.forced_refresh("not_renewable")
            return TokenResult.empty(TokenStatus.REAUTH_REQUIRED)
        if forced and link.forced_seconds_ago is not None and link.forced_seconds_ago < self._settings.forced_interval:
            # The token a forced refresh just produced is refused too: the upstream is wrong, not the token.
            UserLog(log, link.user_id).warning(
                "an upstream rejected the token of a forced refresh %.0fs ago; not refreshing again",
                link.forced_seconds_ago,
            )
            self._obs.forced_refresh("loop_guard")
            return TokenResult.empty(TokenStatus.REAUTH_REQUIRED)
        if not link.refresh_token:
            return fallback(link, TokenStatus.EXPIRED, now)
        if link.refresh_token in self._rejected:
            return fallback(link, TokenStatus.REAUTH_REQUIRED, now)
        idle = link.marker_idle_seconds
        if idle is not None:
            if idle < self._settings.holder_dead_after:
                raise RefreshInFlight("refresh token already at the IdP from a live holder; not sending it again")
            UserLog(log, link.user_id).warning(
                "the holder of this refresh token's in-flight marker is gone (no heartbeat for %.1fs); taking it "
                "over and sending the token once",
                idle,
            )
        return None

    async def _send(self, locked: LockedLink, link: Link) -> RefreshedTokens:
        """Mark the token in flight (with a live heartbeat), send it, and settle the marker by the outcome."""
        uid, used = link.user_id, link.refresh_token
        await locked.mark_in_flight()
        self._liveness.hold(uid, used)
        try:
            with self._tracer.span("idp.refresh"):
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
            UserLog(log, uid).info("refresh token was rotated meanwhile; using the new state")
            if retry_on_rotation and needs_refresh(latest, self._clock(), self._settings.leeway):
                return await self._locked_refresh(latest, retry_on_rotation=False)
            return fallback(latest, TokenStatus.REAUTH_REQUIRED, self._clock())
        self._rejected.remember(used)
        UserLog(log, uid).warning(
            "identity provider rejected the refresh (%s); not retrying this refresh token for %ss",
            rejection.error,
            self._settings.reauth_backoff,
        )
        return fallback(latest or seen, TokenStatus.REAUTH_REQUIRED, self._clock())
