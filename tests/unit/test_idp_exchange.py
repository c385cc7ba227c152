"""The token exchange's answer table (RFC 8693 section 2.2) against a fake transport: the answers the test IdP
cannot be made to give."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl

import httpx2
import pytest

from broker.errors import ExchangeDenied, IdpUnavailable, SubjectTokenRejected
from broker.idp import OidcRefresher
from broker.model import Secret

TOKEN_URL = "https://idp.example.com/token"
GOOD = {
    "access_token": "bound",
    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
    "token_type": "Bearer",
    "expires_in": 300,
}


def exchanger(
    status: int, body: Any, seen: list[httpx2.Request] | None = None, headers: dict[str, str] | None = None
) -> OidcRefresher:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if seen is not None:
            seen.append(request)
        if isinstance(body, str):
            return httpx2.Response(status, text=body, headers=headers)
        return httpx2.Response(status, json=body, headers=headers)

    return OidcRefresher(
        client_id="cid",
        client_secret=Secret("csecret"),
        timeout=1.0,
        token_url=TOKEN_URL,
        transport=httpx2.MockTransport(handler),
    )


async def test_sends_the_rfc_8693_request_authenticated_as_the_broker() -> None:
    seen: list[httpx2.Request] = []
    idp = exchanger(200, GOOD, seen)
    token = await idp.exchange(Secret("login"), "https://mcp.example.com/mcp", "mcp-aud", "tools.read")
    await idp.aclose()
    (req,) = seen
    assert dict(parse_qsl(req.content.decode())) == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": "login",
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "resource": "https://mcp.example.com/mcp",
        "audience": "mcp-aud",
        "scope": "tools.read",
    }
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"cid:csecret").decode()
    assert token.access_token.reveal() == "bound"
    assert token.expiry is not None


async def test_no_audience_or_scope_is_sent_when_the_policy_names_none() -> None:
    seen: list[httpx2.Request] = []
    idp = exchanger(200, {**GOOD, "expires_in": None}, seen)
    token = await idp.exchange(Secret("login"), "https://mcp.example.com/mcp", "", "")
    await idp.aclose()
    assert "audience" not in req_body(seen) and "scope" not in req_body(seen)  # noqa: PT018
    assert token.expiry is None  # no expires_in and no JWT exp: answered, never cached (the domain's rule)


def req_body(seen: list[httpx2.Request]) -> dict[str, str]:
    return dict(parse_qsl(seen[0].content.decode()))


@pytest.mark.parametrize(
    ("status", "body", "raised"),
    [
        (200, {**GOOD, "issued_token_type": "urn:ietf:params:oauth:token-type:refresh_token"}, ExchangeDenied),
        (200, {**GOOD, "token_type": "N_A"}, ExchangeDenied),
        (200, {**GOOD, "token_type": "bearer"}, None),
        (200, "not json", IdpUnavailable),
        (200, {"issued_token_type": GOOD["issued_token_type"]}, IdpUnavailable),
        (400, {"error": "invalid_grant"}, SubjectTokenRejected),
        (400, {"error": "invalid_request", "error_description": "subject_token is expired"}, SubjectTokenRejected),
        (400, {"error": "invalid_request", "error_description": "missing resource"}, IdpUnavailable),
        (400, {"error": "invalid_target"}, ExchangeDenied),
        (400, {"error": "unauthorized_client"}, ExchangeDenied),
        (403, {"error": "access_denied"}, ExchangeDenied),
        (400, {"error": "invalid_scope"}, ExchangeDenied),
        (401, {"error": "invalid_client"}, ExchangeDenied),
        (400, {"error": "unsupported_grant_type"}, ExchangeDenied),
        (429, {"error": "slow_down"}, IdpUnavailable),
        (503, "down", IdpUnavailable),
        (400, {"error": "temporarily_unavailable"}, IdpUnavailable),
    ],
)
async def test_answers_are_classified(status: int, body: Any, raised: type[Exception] | None) -> None:
    idp = exchanger(status, body)
    try:
        if raised is None:
            await idp.exchange(Secret("login"), "https://mcp.example.com/mcp", "", "")
        else:
            with pytest.raises(raised) as err:
                await idp.exchange(Secret("login-token-value"), "https://mcp.example.com/mcp", "", "")
            assert "login-token-value" not in str(err.value)
    finally:
        await idp.aclose()


async def test_retry_after_is_kept_for_the_circuit() -> None:
    idp = exchanger(503, "down", headers={"retry-after": "7"})
    with pytest.raises(IdpUnavailable) as err:
        await idp.exchange(Secret("login"), "https://mcp.example.com/mcp", "", "")
    await idp.aclose()
    assert err.value.retry_after == 7


async def test_invalid_client_is_logged_as_the_operators_problem(caplog: pytest.LogCaptureFixture) -> None:
    idp = exchanger(401, {"error": "invalid_client"})
    with pytest.raises(ExchangeDenied):
        await idp.exchange(Secret("login"), "https://mcp.example.com/mcp", "", "")
    await idp.aclose()
    assert any(r.levelname == "ERROR" and "client's credentials" in r.getMessage() for r in caplog.records)
