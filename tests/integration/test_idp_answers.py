"""How each answer of the token endpoint is taken: only invalid_grant and client errors are rejections, outages are
retried after Retry-After, an unreadable 2xx may have rotated (the marker stays). The IdP is a token endpoint of the
tests' own (tests/support/token_endpoint.py), which gives these answers on cue."""

from __future__ import annotations

import asyncio

import pytest

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import running_broker
from tests.support.pg import Database
from tests.support.token_endpoint import Scripted, TokenEndpoint, env_for, expired_user


async def test_an_unreadable_2xx_keeps_the_marker_and_is_resent_only_after_it_died(
    db: Database, endpoint: TokenEndpoint
) -> None:
    """It may have rotated: no resend while the marker could be live; then exactly one (here the IdP honours an
    overlap window, so the user stays logged in)."""
    endpoint.grace = 30
    uid, old_refresh = await expired_user(db, endpoint)
    endpoint.script.append(Scripted(200, '{"access_token": "at-x", "refresh_tok'))
    async with running_broker(env_for(db, endpoint)) as b:
        first = await b.get(uid)
        assert (first.status, first.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
        assert await db.marker(uid) is not None
        soon = await b.get(uid)
        assert soon.status == pb.TOKEN_STATUS_IDP_UNAVAILABLE
        assert endpoint.sent == [old_refresh]
        await asyncio.sleep(2.3)  # the marker's heartbeat is dead (BROKER's holder_dead_after is 2 s)
        later = await b.get(uid)
    assert later.status == pb.TOKEN_STATUS_REFRESHED
    assert endpoint.sent == [old_refresh, old_refresh]
    assert endpoint.reused == 0


@pytest.mark.parametrize(
    "answer",
    [
        Scripted(429, {"error": "temporarily_unavailable"}, {"Retry-After": "1"}),
        Scripted(503, {"error": "server_error"}, {"Retry-After": "1"}),
        Scripted(400, {"error": "temporarily_unavailable"}, {"Retry-After": "1"}),
    ],
)
async def test_outages_are_not_rejections_and_retry_after_is_honoured(
    db: Database, endpoint: TokenEndpoint, answer: Scripted
) -> None:
    uid, old_refresh = await expired_user(db, endpoint)
    other, _ = await expired_user(db, endpoint)
    endpoint.script.append(answer)
    async with running_broker(env_for(db, endpoint)) as b:
        r = await b.get(uid)
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
        assert await db.marker(uid) is None  # not rotated: the marker is lifted
        held_off = await b.get(other)  # Retry-After: no call goes out for a second
        assert held_off.status == pb.TOKEN_STATUS_IDP_UNAVAILABLE
        assert len(endpoint.sent) == 1
        await asyncio.sleep(1.1)
        ok = await b.get(uid)  # the token was not remembered as rejected
    assert ok.status == pb.TOKEN_STATUS_REFRESHED
    assert endpoint.sent == [old_refresh, old_refresh]


async def test_invalid_client_is_a_rejection_logged_for_the_operator(
    db: Database, endpoint: TokenEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    uid, _ = await expired_user(db, endpoint)
    endpoint.script.append(Scripted(401, {"error": "invalid_client"}))
    async with running_broker(env_for(db, endpoint)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert any(rec.levelname == "ERROR" and "BROKER_OIDC_CLIENT_ID" in rec.getMessage() for rec in caplog.records)
