"""Expiries as an IdP sends them and the product stores them: absurd lifetimes clamped, no `expires_in` stored as
the product's zero time, infinite stored expiries, and a lifetime shorter than the refresh leeway. The IdP is a token
endpoint of the tests' own (tests/support/token_endpoint.py): oidc-provider cannot send these answers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import broker_env, running_broker
from tests.support.pg import Database
from tests.support.token_endpoint import TokenEndpoint, env_for, expired_user


@pytest.mark.parametrize("expires_in", [10**12, float("inf"), float("nan"), -5, "soon", [1]])
async def test_absurd_lifetimes_are_clamped_and_the_rotation_is_kept(
    db: Database, endpoint: TokenEndpoint, expires_in: object
) -> None:
    endpoint.expires_in = expires_in
    uid, old_refresh = await expired_user(db, endpoint)
    async with running_broker(env_for(db, endpoint)) as b:
        r = await b.get(uid)
        again = await b.get(uid)
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    assert again.access_token == r.access_token
    row = await db.link(uid)
    assert row is not None
    assert row["oauth_access_token"] == r.access_token
    assert row["oauth_refresh_token"] not in ("", old_refresh)
    assert row["oauth_expiry"] <= datetime.now(UTC) + timedelta(days=367)
    assert await db.marker(uid) is None
    assert endpoint.sent == [old_refresh]


async def test_an_answer_without_expires_in_is_stored_as_the_products_zero_time(
    db: Database, endpoint: TokenEndpoint
) -> None:
    endpoint.expires_in = None
    uid, _ = await expired_user(db, endpoint)
    async with running_broker(env_for(db, endpoint)) as b:
        first = await b.get(uid)
        second = await b.get(uid)
    assert first.status == pb.TOKEN_STATUS_REFRESHED
    assert (second.status, second.access_token) == (pb.TOKEN_STATUS_VALID, first.access_token)
    row = await db.fetchrow(
        "SELECT oauth_expiry = '0001-01-01 00:00:00+00'::timestamptz AS zero, oauth_expiry::text AS text"
        " FROM user_links WHERE user_id = $1",
        uid,
    )
    assert row is not None
    assert row["zero"] is True, row["text"]  # not '-infinity'


@pytest.mark.parametrize("stored", ["infinity", "-infinity"])
async def test_infinite_expiries_never_expire_and_never_crash(db: Database, stored: str) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "forever", "r", None)
    await db.execute("UPDATE user_links SET oauth_expiry = $2::text::timestamptz WHERE user_id = $1", uid, stored)
    async with running_broker(broker_env(db)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "forever")


async def test_a_300_second_token_under_the_600_second_leeway_is_refreshed_once(
    db: Database, endpoint: TokenEndpoint
) -> None:
    endpoint.expires_in = 300
    uid, _ = await expired_user(db, endpoint)
    async with running_broker(env_for(db, endpoint)) as b:
        answers = [await b.get(uid) for _ in range(5)]
    assert endpoint.grants == 1
    assert [a.status for a in answers] == [pb.TOKEN_STATUS_REFRESHED] + [pb.TOKEN_STATUS_VALID] * 4
