"""The in-flight marker (token_broker.refresh_in_flight) across replicas: only the write that happened lifts it, a
marker whose holder is gone blocks for seconds, and a live holder with unwritten rotated tokens keeps it alive."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import postgres_store, running_broker
from tests.support.pg import Database
from tests.support.stores import SavesFail
from tests.support.token_endpoint import TokenEndpoint, env_for, expired_user


async def test_a_failed_compare_and_set_leaves_the_marker(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a", "r-current", datetime.now(UTC))
    conn = await asyncpg.connect(db.service_url)
    try:
        # another replica's live refresh
        await conn.execute("SELECT token_broker.begin_refresh($1, sha256('r-current'))", uid)
        stored = await conn.fetchval(  # a stale write-back of an older refresh
            "SELECT token_broker.store_refreshed($1, 'r-stale', 'a2', 'r2', now(), NULL, NULL, sha256('r-stale'))", uid
        )
    finally:
        await conn.close()
    assert stored is False
    assert await db.marker(uid) is not None


async def test_a_marker_left_by_anyone_blocks_for_seconds_not_for_the_old_window(
    db: Database, endpoint: TokenEndpoint
) -> None:
    """begin_refresh called outside the broker's sequence (by the login role, or a holder that died): no heartbeat,
    so the next refresh takes it over after about 2 s instead of 40."""
    uid, old_refresh = await expired_user(db, endpoint)
    conn = await asyncpg.connect(db.service_url)
    try:
        await conn.execute("SELECT token_broker.begin_refresh($1, sha256(convert_to($2, 'UTF8')))", uid, old_refresh)
    finally:
        await conn.close()
    async with running_broker(env_for(db, endpoint)) as b:
        assert (await b.get(uid)).status == pb.TOKEN_STATUS_IDP_UNAVAILABLE
        await asyncio.sleep(2.2)
        assert (await b.get(uid)).status == pb.TOKEN_STATUS_REFRESHED
    assert endpoint.sent == [old_refresh]


async def test_no_replica_sends_the_consumed_token_while_a_live_holder_has_the_rotated_one(
    db: Database, endpoint: TokenEndpoint
) -> None:
    uid, old_refresh = await expired_user(db, endpoint)
    async with postgres_store(db) as store:
        failing = SavesFail(store)
        env = env_for(db, endpoint, BROKER_PERSIST_RETRY_SECONDS="1")
        async with running_broker(env, store=failing) as a, running_broker(env) as b:
            first = await a.get(uid)
            assert first.status == pb.TOKEN_STATUS_REFRESHED
            await asyncio.sleep(3.0)  # longer than a dead holder's heartbeat, and than the write-back's warning
            from_b = await b.get(uid)
            assert (from_b.status, from_b.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
            assert (await a.get(uid)).access_token == first.access_token  # served from memory meanwhile
            failing.failing = False
            deadline = time.monotonic() + 10
            while (await b.get(uid)).access_token != first.access_token:
                assert time.monotonic() < deadline, "the write-back never landed"
                await asyncio.sleep(0.1)
    assert endpoint.sent == [old_refresh]
