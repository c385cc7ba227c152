"""The connection pool (#21): the smallest pools serve refreshes and readiness, a read batch nobody waits for costs no
connection, write-back retry tasks are released, and a default deployment behind PgBouncer's transaction pooling
(statement cache on) answers every call."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import uuid
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import DB_POOL_SMALLEST
from broker.errors import StoreUnavailable
from broker.model import RefreshedTokens, Secret
from broker.postgres.lanes import ReadLanes
from broker.postgres.store import LOCK_LINK, STORE_REFRESHED, PostgresStore
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import ROOT, RunningBroker, broker_env, postgres_store, running_broker, warm_discovery
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database
from tests.support.pgbouncer import PgBouncer
from tests.support.pgbouncer import available as pgbouncer_available

SERVICE = "broker.v1.TokenBroker"


async def expired_user(db: Database, idp: OidcTestProvider) -> tuple[uuid.UUID, str]:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=5))
    return uid, issued.access_token


async def readiness(b: RunningBroker) -> int:
    r = await health_pb2_grpc.HealthStub(b.channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
    return int(r.status)


async def wait_serving(b: RunningBroker) -> None:
    for _ in range(100):
        if await readiness(b) == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the broker never became ready")


# -- 1. the smallest pools --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_max", [DB_POOL_SMALLEST, 4, 6])
async def test_concurrent_refreshes_succeed_at_the_smallest_pools_and_readiness_stays_serving(
    db: Database, idp: OidcTestProvider, pool_max: int
) -> None:
    users = [await expired_user(db, idp) for _ in range(4)]
    env = broker_env(db, idp, BROKER_DB_POOL_MIN="1", BROKER_DB_POOL_MAX=str(pool_max), BROKER_REFRESH_LOCK_TIMEOUT="4")
    async with running_broker(env) as b:
        await warm_discovery(b)
        await wait_serving(b)
        idp.set_fault("ok", delay_ms=300)  # every refresh holds its row lock across a slow IdP answer
        before = idp.stats()
        calls = asyncio.gather(*(b.get(uid, timeout=20) for uid, _ in users for _ in range(5)))
        seen: list[int] = []
        while not calls.done():  # readiness all along (the checks run every 0.2 s)
            seen.append(await readiness(b))
            await asyncio.sleep(0.05)
        answers = await calls
        idp.set_fault("ok")
        seen.append(await readiness(b))
    for i, (_, old) in enumerate(users):
        mine = answers[5 * i : 5 * i + 5]
        assert {a.status for a in mine} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}, mine
        assert len({a.access_token for a in mine}) == 1
        assert mine[0].access_token not in ("", old)
    assert set(seen) == {health_pb2.HealthCheckResponse.SERVING}
    d = {k: idp.stats()[k] - before[k] for k in before}
    assert (d["refresh_success"], d["invalid_grant"]) == (len(users), 0)


def test_a_pool_below_the_smallest_is_refused_at_start_up_naming_the_setting(db: Database) -> None:
    env = {**os.environ, **broker_env(db), "BROKER_DB_POOL_MAX": str(DB_POOL_SMALLEST - 1)}
    r = subprocess.run(
        [sys.executable, "-m", "broker", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "BROKER_DB_POOL_MAX" in r.stderr
    assert f"at least {DB_POOL_SMALLEST}" in r.stderr


# -- 4. a read batch whose callers all gave up --------------------------------------------------------------------


async def test_a_batch_whose_callers_all_timed_out_keeps_the_lanes_connection(db: Database) -> None:
    """On a real connection: the batch is not sent with no time left (which cancelled the statement and terminated
    the connection: one reconnect per batch under overload)."""

    async def fetch(conn: asyncpg.pool.PoolConnectionProxy, keys: list[str]) -> Mapping[str, int]:
        pid = await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep($1)", 0.5 if "slow" in keys else 0.0)
        return dict.fromkeys(keys, int(pid))

    async with postgres_store(db) as store:
        lanes = ReadLanes(store, fetch, lambda exc: isinstance(exc, asyncpg.PostgresError), lanes=1)
        try:
            slow = asyncio.create_task(lanes.get("slow", 5))
            await asyncio.sleep(0.1)  # the one lane is busy
            gave_up = [asyncio.create_task(lanes.get(f"late-{i}", 0.05)) for i in range(10)]
            for task in gave_up:
                with pytest.raises(TimeoutError):
                    await task
            first_pid = await slow
            assert await lanes.get("next", 5) == first_pid  # the same server process: the connection was kept
            assert store.pool_stats() == (1, 1)  # and no second one was opened
        finally:
            await lanes.close()  # before the pool closes: it waits for the lane's connection


# -- 5. write-back retry tasks ------------------------------------------------------------------------------------


async def test_write_back_retry_tasks_are_released_once_the_tokens_landed(db: Database, idp: OidcTestProvider) -> None:
    users = [await expired_user(db, idp) for _ in range(3)]
    async with running_broker(broker_env(db, idp, BROKER_PERSIST_RETRY_SECONDS="20")) as b:
        await warm_discovery(b)
        idp.set_fault("ok", delay_ms=600)
        calls = asyncio.gather(*(b.get(uid, timeout=10) for uid, _ in users))
        await asyncio.sleep(0.3)  # the locks are held, the tokens are at the IdP
        await db.set_reachable(False)  # the writes fail; reconnects are refused for a while
        answers = await calls
        idp.set_fault("ok")
        assert {a.status for a in answers} == {pb.TOKEN_STATUS_REFRESHED}
        names = {f"write-back:{uid}" for uid, _ in users}
        retries = [weakref.ref(t) for t in asyncio.all_tasks() if t.get_name() in names]
        assert len(retries) == len(users)
        await db.set_reachable(True)
        for _ in range(200):
            await asyncio.sleep(0.05)
            rows = [await db.link(uid) for uid, _ in users]
            if [r["oauth_access_token"] if r else None for r in rows] == [a.access_token for a in answers]:
                break
        else:
            raise AssertionError("the write-backs never landed")
        for _ in range(100):
            gc.collect()
            if all(r() is None for r in retries):
                break
            await asyncio.sleep(0.05)
        assert [r() for r in retries if r() is not None] == []  # released, not kept for the life of the process


# -- 6. PgBouncer (transaction pooling) with the statement cache on -----------------------------------------------


@pytest.fixture
def bouncer(db: Database) -> Iterator[PgBouncer]:
    if not pgbouncer_available():
        pytest.fail("pgbouncer is not installed (`make test` installs Debian's package)")
    pgb = PgBouncer(db.admin_url, db.name, ["token_broker", "postgres"])
    yield pgb
    pgb.stop()


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "BROKER_DB_STATEMENT_CACHE" in r.getMessage() and r.name == "broker.store"
    ]


@pytest.mark.parametrize("first", ["valid", "expired"])
async def test_default_settings_behind_pgbouncer_answer_every_caller_of_a_stampede(
    db: Database, idp: OidcTestProvider, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture, first: str
) -> None:
    """The statement cache on (the default) behind PgBouncer 1.18 in transaction pooling: the first lost prepared
    statement turns it off (one WARNING), the statements before the IdP call are tried again, and every caller of a
    stampede, on a valid token or an expired one, gets its answer."""
    caplog.set_level(logging.WARNING, logger="broker.store")
    valid = uuid.uuid4()
    await db.insert_link(valid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    expired, old = await expired_user(db, idp)
    before = idp.stats()
    env = broker_env(db, idp, BROKER_DATABASE_URL=bouncer.url(db.service_url))
    assert "BROKER_DB_STATEMENT_CACHE" not in env
    async with running_broker(env) as b:
        results: dict[str, list[pb.GetOIDCAccessTokenResponse]] = {}
        for stampede in [first, *({"valid", "expired"} - {first})]:
            uid = valid if stampede == "valid" else expired
            outcomes = await asyncio.gather(*(b.get(uid, timeout=20) for _ in range(100)), return_exceptions=True)
            failed = [o for o in outcomes if not isinstance(o, pb.GetOIDCAccessTokenResponse)]
            assert failed == [], failed[:3]
            results[stampede] = [o for o in outcomes if isinstance(o, pb.GetOIDCAccessTokenResponse)]
        ready = await readiness(b)
    assert {(a.status, a.access_token) for a in results["valid"]} == {(pb.TOKEN_STATUS_VALID, "tok")}
    crowd = results["expired"]
    assert {a.status for a in crowd} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}, {a.status for a in crowd}
    assert len({a.access_token for a in crowd}) == 1
    assert crowd[0].access_token not in ("", old)
    d = {k: idp.stats()[k] - before[k] for k in before}
    assert (d["refresh_success"], d["invalid_grant"], d["grants_revoked"]) == (1, 0, 0)
    assert ready == health_pb2.HealthCheckResponse.SERVING
    assert len(cache_warnings(caplog)) == 1


async def refresh_token_of(db: Database, uid: uuid.UUID) -> str | None:
    row = await db.link(uid)
    return None if row is None else str(row["oauth_refresh_token"])


async def _hold_the_server_of(bouncer_url: str, pid: int) -> asyncpg.Connection:
    """A client of PgBouncer whose open transaction holds the server connection `pid`, so that the next
    transaction of any other client runs on another one (where a statement prepared on `pid` does not exist)."""
    holders: list[asyncpg.Connection] = []
    try:
        for _ in range(8):  # PgBouncer's default_pool_size
            c = await asyncpg.connect(bouncer_url, statement_cache_size=0)
            holders.append(c)
            await c.execute("BEGIN")
            if await c.fetchval("SELECT pg_backend_pid()") == pid:
                holders.remove(c)
                return c
        raise AssertionError("no PgBouncer client got that server connection")
    finally:
        for c in holders:
            await c.close()


async def test_behind_pgbouncer_the_lock_is_taken_again_but_the_write_after_the_idp_is_not_replayed(
    db: Database, bouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement cached on one server connection and bound on another fails without running. Taking the row lock
    (before the IdP call) is tried once more without the cache; the write of rotated tokens (after it) is not: it
    fails, and is left to the write-back's compare-and-set, which lands once the cache is off."""
    caplog.set_level(logging.WARNING, logger="broker.store")
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) - timedelta(minutes=5))
    url = bouncer.url(db.service_url)
    pool = await PostgresStore.create_pool(url, min_size=1, max_size=1, connect_timeout=5)
    store = PostgresStore(pool)
    try:
        # Lock step: LOCK_LINK is prepared and cached in a transaction on one server connection ...
        async with pool.acquire() as conn, conn.transaction():
            assert await conn.fetchrow(LOCK_LINK, uid) is not None
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        holder = await _hold_the_server_of(url, pid)
        try:
            # ... and bound in a transaction on another, where it does not exist: taken again without the cache.
            async with store.lock_link(uid, lock_timeout=2, hold_timeout=10) as locked:
                assert locked.link is not None
                previous = locked.link
        finally:
            await holder.close()
        assert len(cache_warnings(caplog)) == 1
    finally:
        await store.close()
        await pool.close()

    pool = await PostgresStore.create_pool(url, min_size=1, max_size=1, connect_timeout=5)
    store = PostgresStore(pool)
    rotated = RefreshedTokens(Secret("new-access"), Secret("new-refresh"), datetime.now(UTC) + timedelta(hours=1))
    try:
        # The write of rotated tokens: cached in a transaction on one server connection (a no-op: no row holds
        # that refresh token) ...
        elsewhere = replace(previous, refresh_token=Secret("not-the-row's"))
        async with pool.acquire() as conn, conn.transaction():
            assert not await conn.fetchval(STORE_REFRESHED, *store.codec.store_args(uid, elsewhere, rotated))
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        holder = await _hold_the_server_of(url, pid)
        try:
            # ... then bound on another: it fails and is NOT replayed by the store.
            with pytest.raises(StoreUnavailable):
                await store.save_refreshed(previous, rotated, timeout=5)
        finally:
            await holder.close()
        assert await refresh_token_of(db, uid) == "ref"
        assert await store.save_refreshed(previous, rotated, timeout=5)  # the write-back's next attempt lands
        assert await refresh_token_of(db, uid) == "new-refresh"
        assert len(cache_warnings(caplog)) == 2  # once per pool (this is a second one)
    finally:
        await store.close()
        await pool.close()
