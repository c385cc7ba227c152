"""What a refresh answers: the table from failure to status, and the fallback to the stored token."""

from __future__ import annotations

from datetime import datetime

from broker.core.policy import is_expired
from broker.errors import (
    BrokerError,
    IdpNotConfigured,
    IdpRejected,
    IdpUnavailable,
    RefreshInFlight,
    RefreshLockTimeout,
    StoreUnavailable,
)
from broker.model import Link, RefreshedTokens, TokenResult, TokenStatus

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
    """After a failed refresh: the stored token if it has not actually expired (VALID, remembering `status` as the
    failure), else "" with `status`."""
    if not is_expired(link, now):
        return TokenResult(TokenStatus.VALID, link.access_token, link.expiry, failure=status)
    return TokenResult.empty(status)


def refreshed(tokens: RefreshedTokens) -> TokenResult:
    return TokenResult(TokenStatus.REFRESHED, tokens.access_token, tokens.expiry, refreshed=True)
