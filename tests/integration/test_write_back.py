"""Rotated tokens the database did not take: the commit is bounded and the tokens written later, written before any
further refresh, never served after a new login, and given a last write at shutdown."""

from __future__ import annotations

import asyncio
import time

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import postgres_store, running_broker
from tests.support.pg import Database
from tests.support.proxy import proxied
from tests.support.stores import SavesFail
from tests.support.token_endpoint import TokenEndpoint, env_for, expired_user


async def test_a_commit_through_a_silent_network_is_bounded_and_the_rotation_written_later(
    db: Database, endpoint: TokenEndpoint
) -> None:
    uid, old_refresh = await expired_user(db, endpoint)
    endpoint.token_delay = 0.5
    async with proxied(db) as (proxy, url):
        env = env_for(
            db, endpoint, BROKER_DATABASE_URL=url, BROKER_REFRESH_LOCK_TIMEOUT="1", BROKER_HEALTH_INTERVAL="60"
        )
        async with running_broker(env) as b:
            call = asyncio.create_task(b.get(uid, timeout=10))
            await asyncio.sleep(0.3)  # the lock is held and the token is at the IdP
            proxy.silence()
            started = time.monotonic()
            r = await call
            elapsed = time.monotonic() - started
            assert r.status == pb.TOKEN_STATUS_REFRESHED
            assert elapsed < 2.8  # the write is bounded (lock timeout + 1 s), the connection dropped: not 20 s
            assert b.sample("token_broker_refresh_unpersisted") == 1
            proxy.heal()
            deadline = time.monotonic() + 10
            while (row := await db.link(uid)) is not None and row["oauth_access_token"] != r.access_token:
                assert time.monotonic() < deadline, "the write-back never landed"
                await asyncio.sleep(0.1)
    assert endpoint.sent == [old_refresh]
    assert endpoint.reused == 0


async def test_expired_unwritten_tokens_are_written_before_any_refresh(db: Database, endpoint: TokenEndpoint) -> None:
    endpoint.expires_in = 2  # the rotated access token expires while it waits for its write-back
    uid, old_refresh = await expired_user(db, endpoint)
    async with postgres_store(db) as store:
        failing = SavesFail(store)
        async with running_broker(env_for(db, endpoint), store=failing) as b:
            first = await b.get(uid)
            assert first.status == pb.TOKEN_STATUS_REFRESHED
            await asyncio.sleep(2.2)
            stuck = await b.get(uid)  # the row still holds the consumed token: it must not be sent again
            assert (stuck.status, stuck.access_token) == (pb.TOKEN_STATUS_STORE_UNAVAILABLE, "")
            assert endpoint.sent == [old_refresh]
            failing.failing = False
            deadline = time.monotonic() + 10
            while (r := await b.get(uid)).status != pb.TOKEN_STATUS_REFRESHED or r.access_token == first.access_token:
                assert time.monotonic() < deadline, r
                await asyncio.sleep(0.2)
    assert endpoint.sent[0] == old_refresh
    assert old_refresh not in endpoint.sent[1:]  # the next refresh used the rotated token, once it was written
    assert endpoint.reused == 0


async def test_unwritten_tokens_are_not_served_after_a_new_login(db: Database, endpoint: TokenEndpoint) -> None:
    uid, _ = await expired_user(db, endpoint)
    async with postgres_store(db) as store:
        failing = SavesFail(store)
        async with running_broker(env_for(db, endpoint), store=failing) as b:
            held = await b.get(uid)
            assert held.status == pb.TOKEN_STATUS_REFRESHED
            access, refresh = endpoint.issue()  # the user logs in again: the product writes a new link
            await db.execute(
                "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3,"
                " oauth_expiry = now() + interval '1 hour' WHERE user_id = $1",
                uid,
                access,
                refresh,
            )
            after = await b.get(uid)
            assert b.sample("token_broker_refresh_unpersisted") == 0
    assert (after.status, after.access_token) == (pb.TOKEN_STATUS_VALID, access)


async def test_shutdown_writes_back_what_the_retry_loop_has_not_yet(db: Database, endpoint: TokenEndpoint) -> None:
    uid, _ = await expired_user(db, endpoint)
    async with postgres_store(db) as store:
        failing = SavesFail(store)
        async with running_broker(env_for(db, endpoint), store=failing) as b:
            r = await b.get(uid)
            await asyncio.sleep(3.5)  # the retry loop sleeps 2 s from about 3.2 s on: asleep until about 5.2 s
            failing.failing = False
        row = await db.link(uid)  # stopped: the drain's last attempt wrote it, not the sleeping loop
    assert row is not None
    assert row["oauth_access_token"] == r.access_token
