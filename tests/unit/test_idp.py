"""The authlib adapter against a fake transport: answers the real oidc-provider cannot be made to give."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest

from broker.errors import IdpRejected, IdpUnavailable
from broker.idp import OidcRefresher
from broker.model import Secret

TOKEN_URL = "https://idp.example.com/token"


def refresher(handler: Callable[[httpx2.Request], httpx2.Response], **kw: Any) -> OidcRefresher:
    return OidcRefresher(
        client_id="cid",
        client_secret=Secret("csecret"),
        timeout=1.0,
        token_url=TOKEN_URL,
        transport=httpx2.MockTransport(handler),
        **kw,
    )


def jwt(exp: int) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{payload}.sig"


async def test_sends_a_refresh_grant_with_client_secret_basic() -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(
            200, json={"access_token": "new-a", "refresh_token": "new-r", "expires_in": 300, "token_type": "Bearer"}
        )

    r = refresher(handler)
    tokens = await r.refresh(Secret("old-r"))
    await r.aclose()
    (req,) = seen
    body = dict(x.split("=") for x in req.content.decode().split("&"))
    assert body == {"grant_type": "refresh_token", "refresh_token": "old-r"}
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"cid:csecret").decode()
    assert (tokens.access_token.reveal(), tokens.refresh_token.reveal()) == ("new-a", "new-r")
    assert tokens.expiry is not None
    assert abs(tokens.expiry - (datetime.now(UTC) + timedelta(seconds=300))) < timedelta(seconds=5)


async def test_keeps_the_old_refresh_token_when_none_is_returned() -> None:
    r = refresher(lambda _: httpx2.Response(200, json={"access_token": "a2", "expires_in": 60}))
    tokens = await r.refresh(Secret("keep-me"))
    await r.aclose()
    assert tokens.refresh_token.reveal() == "keep-me"


async def test_jwt_exp_is_used_when_expires_in_is_missing() -> None:
    exp = int(time.time()) + 900
    r = refresher(lambda _: httpx2.Response(200, json={"access_token": jwt(exp)}))
    tokens = await r.refresh(Secret("r"))
    await r.aclose()
    assert tokens.expiry == datetime.fromtimestamp(exp, UTC)


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx2.Response(400, json={"error": "invalid_grant"}), IdpRejected),
        (httpx2.Response(401, json={"error": "invalid_client"}), IdpRejected),
        (httpx2.Response(503, text="down"), IdpUnavailable),
        (httpx2.Response(200, text="<html>not json</html>"), IdpUnavailable),
        (httpx2.Response(200, json=["a", "list"]), IdpUnavailable),
        (httpx2.Response(200, json={"token_type": "Bearer"}), IdpUnavailable),
        (httpx2.Response(429, text="slow down"), IdpUnavailable),
    ],
)
async def test_errors_are_translated(response: httpx2.Response, error: type[Exception]) -> None:
    r = refresher(lambda _: response)
    with pytest.raises(error) as exc:
        await r.refresh(Secret("secret-refresh-value"))
    await r.aclose()
    assert "secret-refresh-value" not in str(exc.value)
    assert "csecret" not in str(exc.value)


async def test_connection_errors_are_idp_unavailable() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    r = refresher(handler)
    with pytest.raises(IdpUnavailable):
        await r.refresh(Secret("r"))
    await r.aclose()


async def test_discovery_is_cached() -> None:
    calls: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("openid-configuration"):
            return httpx2.Response(200, json={"token_endpoint": TOKEN_URL, "issuer": "https://idp.example.com"})
        return httpx2.Response(200, json={"access_token": "a", "expires_in": 60})

    r = OidcRefresher(
        client_id="c",
        client_secret=Secret("s"),
        timeout=1,
        issuer="https://idp.example.com",
        transport=httpx2.MockTransport(handler),
    )
    for _ in range(3):
        await r.refresh(Secret("r"))
    await r.aclose()
    assert calls.count("/.well-known/openid-configuration") == 1
    assert calls.count("/token") == 3


async def test_discovery_rejects_a_plain_http_token_endpoint() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"token_endpoint": "http://evil.example.com/token"})

    r = OidcRefresher(
        client_id="c",
        client_secret=Secret("s"),
        timeout=1,
        issuer="https://idp.example.com",
        transport=httpx2.MockTransport(handler),
    )
    with pytest.raises(IdpUnavailable):
        await r.refresh(Secret("r"))
    await r.aclose()
