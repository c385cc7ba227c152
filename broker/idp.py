"""The OAuth2/OIDC adapter (authlib over httpx2): discovery, the refresh_token grant, and IdP errors translated.

authlib prefers httpx2 and deprecates its plain-httpx fallback, so the broker depends on httpx2 deliberately.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client

from broker.errors import ConfigError, IdpRejected, IdpUnavailable
from broker.model import RefreshedTokens, Secret
from broker.policy import expiry_from_response

log = logging.getLogger("broker.idp")

DISCOVERY_TTL = 3600.0


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(name: str, url: str) -> str | None:
    """An error message when `url` is not https (plain http is allowed only on loopback), else None."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return None
    return f"{name} must be an https URL (plain http only on loopback addresses)"


class OidcRefresher:
    """IdentityProvider on authlib's AsyncOAuth2Client; one HTTP connection pool for the process."""

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
    ) -> None:
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
        self._client = AsyncOAuth2Client(
            client_id=client_id,
            client_secret=client_secret.reveal(),
            token_endpoint_auth_method=auth_method,
            **kwargs,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def token_endpoint(self) -> str:
        """BROKER_OIDC_TOKEN_URL, else the issuer's discovery document (cached for an hour)."""
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
        url = await self.token_endpoint()
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._client.refresh_token(url, refresh_token=refresh_token.reveal())
        except OAuthError as exc:
            raise IdpRejected(str(exc.error or "oauth_error"), exc.description) from None
        except TimeoutError:
            raise IdpUnavailable(f"identity provider timed out after {self._timeout}s") from None
        except httpx2.HTTPStatusError as exc:
            raise IdpUnavailable(f"identity provider answered HTTP {exc.response.status_code}") from None
        except httpx2.HTTPError as exc:
            raise IdpUnavailable(f"identity provider unreachable: {type(exc).__name__}") from None
        except ValueError:
            raise IdpUnavailable("identity provider answered something that is not a token response") from None
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise IdpUnavailable("identity provider answered without an access_token")
        new_refresh = body.get("refresh_token")
        if not isinstance(new_refresh, str) or not new_refresh:
            new_refresh = refresh_token.reveal()  # no rotation: keep the old one
        return RefreshedTokens(
            access_token=Secret(access),
            refresh_token=Secret(new_refresh),
            expiry=expiry_from_response(body, datetime.now(UTC)),
        )
