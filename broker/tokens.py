"""The use case: answer "give me user U's OIDC access token" from the store, refreshing through the refresher."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from uuid import UUID

from broker.errors import StoreUnavailable
from broker.model import AccountState, TokenResult, TokenStatus
from broker.policy import Decision, decide
from broker.ports import LinkStore
from broker.refresher import Refresher, utcnow

log = logging.getLogger("broker.tokens")


class TokenService:
    """Reads the link (one database round trip), decides, and serves or refreshes."""

    def __init__(
        self,
        store: LinkStore,
        refresher: Refresher,
        *,
        leeway: timedelta,
        refresh_ahead: timedelta,
        idp_configured: bool,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._refresher = refresher
        self._leeway = leeway
        self._ahead = refresh_ahead
        self._idp_configured = idp_configured
        self._clock = clock

    async def get_token(self, user_id: UUID, budget: float) -> TokenResult:
        try:
            link = await self._store.get_link(user_id, timeout=budget)
        except StoreUnavailable as exc:
            pending = self._refresher.pending_result(user_id)
            if pending is not None:
                return pending
            log.warning("store unavailable: %s", exc, extra={"user_id": str(user_id)})
            return TokenResult.empty(TokenStatus.STORE_UNAVAILABLE)
        if link is None:
            return TokenResult.empty(TokenStatus.NO_LINK)
        if link.account is AccountState.DISABLED:
            return TokenResult.empty(TokenStatus.ACCOUNT_DISABLED)
        if link.encrypted:
            log.error(
                "link tokens are encrypted (dbcrypt); the broker cannot decrypt them", extra={"user_id": str(user_id)}
            )
            return TokenResult.empty(TokenStatus.STORE_UNAVAILABLE)

        decision = decide(link, self._clock(), self._leeway, self._ahead)
        if decision is Decision.SERVE:
            return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
        if decision is Decision.EXPIRED:
            return TokenResult.empty(TokenStatus.EXPIRED)
        if decision is Decision.SERVE_AND_REFRESH_AHEAD:
            if self._idp_configured:
                self._refresher.refresh_ahead(link)
            return TokenResult(TokenStatus.VALID, link.access_token, link.expiry)
        return await self._refresher.refresh(link, budget)
