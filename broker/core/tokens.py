"""The use case: answer "give me user U's OIDC access token" from the store, refreshing through the refresher."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from uuid import UUID

from broker.core.interfaces import LinkStore, NullObserver, RefreshObserver
from broker.core.policy import Decision, decide, is_expired
from broker.core.refresh import Refresher, RefreshSettings
from broker.core.refresh.background import Activity
from broker.core.refresh.outcomes import fallback
from broker.core.refresh.rejections import RejectedAccessTokens
from broker.core.refresh.writeback import WriteBack
from broker.errors import IdpNotConfigured, StoreUnavailable
from broker.model import REAUTH_REQUIRED, RECOVERED, AccountState, Link, TokenResult, TokenStatus, utcnow
from broker.telemetry.logs import UserLog
from broker.telemetry.tracing import NULL_TRACER, Tracer

log = logging.getLogger("broker.tokens")


class Lifetimes:
    """The access-token lifetime this process last saw the IdP grant each user (bounded), for the leeway cap when
    the token itself does not say (an opaque token has no iat/exp)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._seen: dict[UUID, timedelta] = {}

    def note(self, user_id: UUID, result: TokenResult, now: datetime) -> None:
        if not result.refreshed or result.expiry is None or result.expiry <= now:
            return
        if len(self._seen) >= self._limit:
            self._seen.pop(next(iter(self._seen)))
        self._seen[user_id] = result.expiry - now

    def get(self, user_id: UUID) -> timedelta | None:
        return self._seen.get(user_id)


class TokenService:
    """Reads the link (one database round trip), decides, and serves or refreshes; the whole within one budget."""

    def __init__(
        self,
        store: LinkStore,
        refresher: Refresher,
        writeback: WriteBack,
        settings: RefreshSettings,
        *,
        observer: RefreshObserver | None = None,
        tracer: Tracer = NULL_TRACER,
        clock: Callable[[], datetime] = utcnow,
        activity: Activity | None = None,
    ) -> None:
        self._tracer = tracer
        self._observer: RefreshObserver = observer or NullObserver()
        self._store = store
        self._refresher = refresher
        self._writeback = writeback
        self._leeway = settings.leeway
        self._ahead = settings.refresh_ahead
        self._clock = clock
        self._lifetimes = Lifetimes()
        self._rejections = RejectedAccessTokens(store)
        self._activity = activity

    def lifetime(self, user_id: UUID) -> timedelta | None:
        """The access-token lifetime this process last saw the IdP grant the user."""
        return self._lifetimes.get(user_id)

    async def get_token(self, user_id: UUID, budget: float, rejected: bytes | None = None) -> TokenResult:
        """The user's token within `budget` seconds. `rejected`: SHA-256 of an access token an upstream refused."""
        deadline = time.monotonic() + budget
        try:
            with self._tracer.span("db.read_link"):
                link = await self._store.get_link(user_id, timeout=budget)
        except StoreUnavailable as exc:
            pending = self._writeback.pending(user_id)
            served = self._writeback.serve(pending) if pending is not None else None
            if served is not None:
                return served
            UserLog(log, user_id).warning("store unavailable: %s", exc)
            return TokenResult.empty(TokenStatus.STORE_UNAVAILABLE)
        return await self.answer(user_id, link, deadline, rejected)

    async def answer(
        self, user_id: UUID, link: Link | None, deadline: float, rejected: bytes | None = None
    ) -> TokenResult:
        """The user's token from `link`, just read by the caller (the exchange reads it with its cache row in one
        round trip); `deadline` is on time.monotonic()."""
        if link is None:
            return TokenResult.empty(TokenStatus.NO_LINK)
        if link.account is AccountState.DISABLED:
            return TokenResult.empty(TokenStatus.ACCOUNT_DISABLED)
        if link.unreadable is not None:
            UserLog(log, user_id).error("stored tokens cannot be read: %s", link.unreadable)
            return TokenResult.empty(TokenStatus.STORE_UNAVAILABLE)
        if self._activity is not None:
            self._activity.seen(link)
        pending = self._writeback.reconcile(link)
        if pending is None and link.reauth_fingerprint is not None:
            if link.known_dead:
                return self._known_dead(link, rejected)
            # The tokens are no longer those recorded as dead: a new login.
            await self._recovered(link, deadline - time.monotonic())
        if rejected is not None:
            current = pending.tokens.access_token if pending is not None else link.access_token
            if current and current.sha256() == rejected:
                remembered = pending is None and link.access_rejected
                return await self._forced(link, deadline, rejected, remembered=remembered)
            self._observer.forced_refresh("replaced")  # another caller or replica replaced it already: serve that
        if pending is None and link.access_rejected and not is_expired(link, self._clock()):
            # An upstream rejected this token before, and no refresh has replaced it yet (the IdP was down, say):
            # never serve it; refresh as that report did.
            return await self._forced(link, deadline, link.access_token.sha256(), remembered=True)
        if pending is not None:
            # This process holds rotated tokens the row does not have yet: the refresher serves or lands them.
            return await self._refresher.refresh(link, deadline)

        now = self._clock()
        decision = decide(link, now, self._leeway, self._ahead, self._lifetimes.get(user_id))
        if decision is Decision.SERVE:
            return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
        if decision is Decision.EXPIRED:
            if not link.refresh_token and not isinstance(self._refresher.refusal(), IdpNotConfigured):
                await self._note_dead(link, "no_refresh_token", forced=False, budget=deadline - time.monotonic())
            return TokenResult.empty(TokenStatus.EXPIRED)
        if decision is Decision.SERVE_AND_REFRESH_AHEAD:
            self._refresher.refresh_ahead(link)
            return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
        result = await self._refresher.refresh(link, deadline)
        self._lifetimes.note(user_id, result, self._clock())
        return result

    async def _forced(self, link: Link, deadline: float, rejected: bytes, *, remembered: bool) -> TokenResult:
        """The upstream refused the token this broker serves for the user: refresh now, or tell that the user must
        log in again. Never the rejected token: the rejection is stored first (unless `remembered` already), so that
        no worker or replica serves it either, whatever becomes of the refresh."""
        if not remembered:
            await self._rejections.remember(link.user_id, rejected, timeout=deadline - time.monotonic())
        if not link.refresh_token or isinstance(self._refresher.refusal(), IdpNotConfigured):
            self._observer.forced_refresh("not_renewable")
            if not link.refresh_token and not isinstance(self._refresher.refusal(), IdpNotConfigured):
                await self._note_dead(link, "no_refresh_token", forced=True, budget=deadline - time.monotonic())
            return TokenResult.empty(TokenStatus.REAUTH_REQUIRED)
        result = await self._refresher.refresh(link, deadline, rejected=rejected)
        self._lifetimes.note(link.user_id, result, self._clock())
        return result

    def _known_dead(self, link: Link, rejected: bytes | None) -> TokenResult:
        """The link is recorded as needing a new login and still has the same tokens: answer without the IdP.
        A token that has not expired is still served; an upstream's rejection of it is final."""
        now = self._clock()
        decision = decide(link, now, self._leeway, self._ahead, self._lifetimes.get(link.user_id))
        if decision is Decision.EXPIRED:
            return TokenResult.empty(TokenStatus.EXPIRED)
        if link.access_rejected or (rejected is not None and link.access_token.sha256() == rejected):
            return TokenResult.empty(TokenStatus.REAUTH_REQUIRED)  # never a token an upstream rejected
        if decision in (Decision.SERVE, Decision.SERVE_AND_REFRESH_AHEAD):
            return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
        return fallback(link, TokenStatus.REAUTH_REQUIRED, now)

    async def _note_dead(self, link: Link, error: str, *, forced: bool, budget: float) -> None:
        """Record that the link needs a new login (once, whoever comes first); a database failure leaves it to the
        next request."""
        try:
            if await self._store.note_reauth_required(link, error, forced=forced, timeout=max(budget, 0.1)):
                self._observer.link_event(REAUTH_REQUIRED)
                UserLog(log, link.user_id).info("link needs a new login (%s)", error)
        except StoreUnavailable as exc:
            UserLog(log, link.user_id).warning("re-auth-required state not recorded: %s", exc)

    async def _recovered(self, link: Link, budget: float) -> None:
        assert link.reauth_fingerprint is not None
        try:
            if await self._store.note_recovered(link.user_id, link.reauth_fingerprint, "login", timeout=budget):
                self._observer.link_event(RECOVERED)
                UserLog(log, link.user_id).info("link recovered (new login)")
        except StoreUnavailable as exc:
            UserLog(log, link.user_id).warning("recovery not recorded: %s", exc)
