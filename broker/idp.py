"""The OAuth2/OIDC adapter (authlib over httpx2): discovery, the refresh_token grant, and IdP answers classified.

authlib prepares the grant and authenticates the client (client_secret_basic or _post); this module reads the HTTP
answer itself, because what the broker must do depends on the status code as much as on the body:

| answer                                            | raised                     | marker     |
|---------------------------------------------------|----------------------------|------------|
| 2xx with an access_token                          | (tokens returned)          | written    |
| 2xx that cannot be read as a token response       | IdpOutcomeUnknown          | kept       |
| 4xx `invalid_grant`                               | IdpRejected                | lifted     |
| 4xx `invalid_client` / `unauthorized_client`      | IdpRejected, logged ERROR  | lifted     |
| 429, 5xx, `temporarily_unavailable`, other errors | IdpUnavailable(retry_after)| lifted     |
| connection refused / connect timeout              | IdpUnavailable             | lifted     |
| timeout or broken connection after sending        | IdpOutcomeUnknown          | kept       |

The token exchange (RFC 8693, `exchange`) is read by its own table; nothing rotates in an exchange, so there is no
"outcome unknown" and no marker:

| answer                                                           | raised                       |
|------------------------------------------------------------------|------------------------------|
| 2xx, a Bearer access token (`issued_token_type` access_token)     | (token returned)             |
| 2xx, another token type or token_type                            | ExchangeDenied               |
| 2xx that cannot be read                                          | IdpUnavailable               |
| 4xx `invalid_grant`, or `invalid_request` naming the subject token | SubjectTokenRejected       |
| 4xx `invalid_target`, `unauthorized_client`, `access_denied`,     | ExchangeDenied               |
| `invalid_scope`, `unsupported_grant_type`, `invalid_client` (ERROR) |                            |
| 429, 5xx, other errors, connection failures, timeouts             | IdpUnavailable(retry_after)  |

authlib prefers httpx2 and deprecates its plain-httpx fallback, so the broker depends on httpx2 deliberately.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx2
from authlib.common.urls import url_decode
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.client import DEFAULT_HEADERS

from broker.core.policy import expiry_from_response
from broker.errors import (
    ConfigError,
    ExchangeDenied,
    IdpOutcomeUnknown,
    IdpRejected,
    IdpUnavailable,
    SubjectTokenRejected,
)
from broker.model import ExchangedToken, RefreshedTokens, Secret
from broker.telemetry.tracing import NULL_TRACER, Tracer
from broker.urls import check_url

log = logging.getLogger("broker.idp")

DISCOVERY_TTL = 3600.0
#: Retry-After values above this are capped: an IdP cannot silence the broker for longer than five minutes.
MAX_RETRY_AFTER = 300.0
#: Errors that mean "this refresh token (or this client) is refused"; every other OAuth error is an outage.
REJECTIONS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})
OPERATOR_ERRORS = frozenset({"invalid_client", "unauthorized_client"})

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a grant type name
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a token type name
#: Token-exchange errors that are the IdP's policy saying no (RFC 8693 section 2.2.2, RFC 6749, RFC 8707).
EXCHANGE_DENIALS = frozenset(
    {
        "invalid_target",
        "unauthorized_client",
        "access_denied",
        "invalid_scope",
        "invalid_client",
        "unsupported_grant_type",
    }
)


class _RawTokenClient(AsyncOAuth2Client):  # type: ignore[misc]  # authlib is untyped
    """authlib's client, returning the HTTP answer of the refresh grant unparsed (and keeping no token state)."""

    async def _refresh_token(  # type: ignore[no-untyped-def]  # authlib's private signature
        self, url, refresh_token=None, body="", headers=None, auth=None, **kwargs
    ):
        return await self.post(url, data=dict(url_decode(body)), headers=headers, auth=auth, **kwargs)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date, capped at MAX_RETRY_AFTER; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), MAX_RETRY_AFTER)


class OidcRefresher:
    """IdentityProvider on authlib's AsyncOAuth2Client; one HTTP connection pool for the process.

    Every call, discovery included, is bounded by `timeout` as a whole."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: Secret,
        timeout: float,
        issuer: str | None = None,
        token_url: str | None = None,
        auth_method: str = "client_secret_basic",
        transport: httpx2.AsyncBaseTransport | None = None,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self._tracer = tracer
        if not issuer and not token_url:
            raise ConfigError("BROKER_OIDC_ISSUER or BROKER_OIDC_TOKEN_URL is required")
        self._issuer = issuer.rstrip("/") if issuer else None
        self._static_token_url = token_url
        self._token_url: str | None = None
        self._discovered_at = 0.0
        self._discovery_lock = asyncio.Lock()
        self._timeout = timeout
        kwargs: dict[str, Any] = {"timeout": timeout}
        if transport is not None:
            kwargs["transport"] = transport
        self._client = _RawTokenClient(
            client_id=client_id,
            client_secret=client_secret.reveal(),
            token_endpoint_auth_method=auth_method,
            **kwargs,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def token_endpoint(self) -> str:
        """BROKER_OIDC_TOKEN_URL, else the issuer's discovery document (cached for an hour). Bounded by the IdP
        timeout as a whole, the wait for another caller's discovery included."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._token_endpoint()
        except TimeoutError:
            raise IdpUnavailable(f"OIDC discovery timed out after {self._timeout}s") from None

    async def _token_endpoint(self) -> str:
        if self._static_token_url:
            return self._static_token_url
        if self._token_url and time.monotonic() - self._discovered_at < DISCOVERY_TTL:
            return self._token_url
        async with self._discovery_lock:
            if self._token_url and time.monotonic() - self._discovered_at < DISCOVERY_TTL:
                return self._token_url
            url = f"{self._issuer}/.well-known/openid-configuration"
            try:
                resp = await self._client.request("GET", url, withhold_token=True, timeout=self._timeout)
                resp.raise_for_status()
                doc = resp.json()
            except (httpx2.HTTPError, ValueError) as exc:
                raise IdpUnavailable(f"OIDC discovery failed: {type(exc).__name__}") from None
            endpoint = doc.get("token_endpoint") if isinstance(doc, dict) else None
            if not isinstance(endpoint, str) or check_url("token_endpoint", endpoint):
                raise IdpUnavailable("OIDC discovery document has no usable token_endpoint")
            self._token_url = endpoint
            self._discovered_at = time.monotonic()
            return endpoint

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens:
        started = time.monotonic()
        url = await self.token_endpoint()
        remaining = self._timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise IdpUnavailable(f"identity provider timed out after {self._timeout}s")
        try:
            async with asyncio.timeout(remaining):
                resp = await self._client.refresh_token(url, refresh_token=refresh_token.reveal(), **self._headers())
        except TimeoutError:
            raise IdpOutcomeUnknown(f"identity provider timed out after {self._timeout}s") from None
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
            raise IdpUnavailable(f"identity provider unreachable: {type(exc).__name__}") from None
        except httpx2.HTTPError as exc:
            raise IdpOutcomeUnknown(f"connection to the identity provider broke: {type(exc).__name__}") from None
        return self._read_answer(resp, refresh_token)

    async def exchange(self, subject: Secret, resource: str, audience: str, scope: str) -> ExchangedToken:
        """RFC 8693 token exchange of `subject` (the user's login access token) for a token issued for `resource`
        (RFC 8707), authenticated as the broker's client. Bounded by the IdP timeout as a whole."""
        started = time.monotonic()
        url = await self.token_endpoint()
        remaining = self._timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise IdpUnavailable(f"identity provider timed out after {self._timeout}s")
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject.reveal(),
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "resource": resource,
        }
        if audience:
            data["audience"] = audience
        if scope:
            data["scope"] = scope
        auth = self._client.client_auth(self._client.token_endpoint_auth_method)
        headers = self._headers().get("headers", DEFAULT_HEADERS)
        try:
            async with asyncio.timeout(remaining):
                resp = await self._client.post(url, data=data, headers=headers, auth=auth)
        except TimeoutError:
            raise IdpUnavailable(f"identity provider timed out after {self._timeout}s") from None
        except httpx2.HTTPError as exc:
            raise IdpUnavailable(f"identity provider unreachable: {type(exc).__name__}") from None
        return _exchanged(resp)

    def _headers(self) -> dict[str, Any]:
        """With tracing on, the request carries the trace context (traceparent) to the IdP."""
        carrier: dict[str, str] = {}
        self._tracer.inject(carrier)
        return {"headers": {**DEFAULT_HEADERS, **carrier}} if carrier else {}

    def _read_answer(self, resp: httpx2.Response, sent: Secret) -> RefreshedTokens:
        status = resp.status_code
        if 200 <= status < 300:
            return _tokens(resp, sent)
        retry_after = retry_after_seconds(resp.headers.get("retry-after"))
        if status == 429 or status >= 500:
            raise IdpUnavailable(f"identity provider answered HTTP {status}", retry_after=retry_after)
        error = _oauth_error(resp)
        if error in REJECTIONS:
            if error in OPERATOR_ERRORS:
                log.error(
                    "identity provider refused the broker's client (%s): check BROKER_OIDC_CLIENT_ID, the client "
                    "secret and BROKER_OIDC_AUTH_METHOD",
                    error,
                )
            raise IdpRejected(error, None)
        what = error or "no OAuth error"
        raise IdpUnavailable(f"identity provider answered HTTP {status} ({what})", retry_after=retry_after)


def _oauth_error(resp: httpx2.Response) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) and error.isascii() and len(error) <= 64 else None


def _tokens(resp: httpx2.Response, sent: Secret) -> RefreshedTokens:
    """A 2xx token response. Anything unreadable here may still have rotated the token: IdpOutcomeUnknown."""
    try:
        body = resp.json()
    except ValueError:
        raise IdpOutcomeUnknown("identity provider answered 2xx with something that is not JSON") from None
    if not isinstance(body, dict):
        raise IdpOutcomeUnknown("identity provider answered 2xx with JSON that is not an object")
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise IdpOutcomeUnknown("identity provider answered 2xx without an access_token")
    new_refresh = body.get("refresh_token")
    if not isinstance(new_refresh, str) or not new_refresh:
        new_refresh = sent.reveal()  # no rotation: keep the one that was sent
    return RefreshedTokens(
        access_token=Secret(access),
        refresh_token=Secret(new_refresh),
        expiry=expiry_from_response(body, datetime.now(UTC)),
    )


def _exchanged(resp: httpx2.Response) -> ExchangedToken:
    """A token-exchange answer, checked as RFC 8693 section 2.2.1 says."""
    status = resp.status_code
    if 200 <= status < 300:
        try:
            body = resp.json()
        except ValueError:
            raise IdpUnavailable("identity provider answered the exchange with something that is not JSON") from None
        access = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(access, str) or not access:
            raise IdpUnavailable("identity provider answered the exchange without an access_token")
        if body.get("issued_token_type") != ACCESS_TOKEN_TYPE:
            raise ExchangeDenied("issued_token_type is not an access token")
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise ExchangeDenied("token_type is not Bearer")
        return ExchangedToken(Secret(access), expiry_from_response(body, datetime.now(UTC)))
    retry_after = retry_after_seconds(resp.headers.get("retry-after"))
    if status == 429 or status >= 500:
        raise IdpUnavailable(f"identity provider answered HTTP {status}", retry_after=retry_after)
    error = _oauth_error(resp)
    if error == "invalid_grant" or (error == "invalid_request" and "subject_token" in _description(resp)):
        raise SubjectTokenRejected(error)
    if error in EXCHANGE_DENIALS:
        if error in ("invalid_client", "unsupported_grant_type"):
            log.error(
                "identity provider refused the broker's token exchange (%s): check the client's credentials and "
                "that token exchange is enabled for it (docs/audience-bound-tokens.md)",
                error,
            )
        raise ExchangeDenied(error)
    what = error or "no OAuth error"
    raise IdpUnavailable(f"identity provider answered HTTP {status} ({what})", retry_after=retry_after)


def _description(resp: httpx2.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    text = body.get("error_description") if isinstance(body, dict) else None
    return text[:500] if isinstance(text, str) else ""
