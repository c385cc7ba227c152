"""Refresh safety against the real oidc-provider with rotation and reuse detection on.

Refresh grants are counted by the IdP's own event hooks (`/__test/stats`), never by the broker's counters.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from broker.postgres.store import PostgresStore
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env, postgres_store, running_broker, warm_discovery
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database


def past() -> datetime:
    return datetime.now(UTC) - timedelta(minutes=5)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


async def kill_locked_connections(db: Database) -> int:
    """Terminate the broker's connections that hold a transaction open (the refresh lock); returns how many."""
    admin = await db.admin()
    try:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND"
                " application_name = 'token-broker' AND state = 'idle in transaction'",
                db.name,
            )
        )
    finally:
        await admin.close()


async def wait_for_access_token(db: Database, uid: uuid.UUID, token: str, *, seconds: float) -> asyncpg.Record:
    """The link row once it holds `token` (a retried write-back lands asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        row = await db.link(uid)
        if (row is not None and row["oauth_access_token"] == token) or time.monotonic() > deadline:
            assert row is not None
            return row
        await asyncio.sleep(0.1)


async def expired_user(db: Database, idp: OidcTestProvider) -> tuple[uuid.UUID, str]:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, past())
    return uid, issued.access_token


async def test_300_concurrent_callers_share_one_refresh(db: Database, idp: OidcTestProvider) -> None:
    uid, old = await expired_user(db, idp)
    before = idp.stats()
    async with running_broker(broker_env(db, idp)) as b:
        started = time.perf_counter()
        answers = await asyncio.gather(*(b.get(uid) for _ in range(300)))
        wall = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(b.get(uid) for _ in range(300)))  # baseline: the same 300 calls, token now valid
        valid_wall = time.perf_counter() - started
    d = delta(before, idp.stats())
    assert d["refresh_success"] == 1
    assert d["invalid_grant"] == 0
    tokens = {a.access_token for a in answers}
    assert len(tokens) == 1
    assert old not in tokens
    assert "" not in tokens
    assert {a.status for a in answers} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}
    print(
        f"\n300 callers, one expired user: {wall * 1000:.0f} ms wall, {d['refresh_success']} refresh grant; "
        f"same 300 calls on the valid token: {valid_wall * 1000:.0f} ms (ratio {wall / valid_wall:.2f})"
    )


async def test_two_broker_processes_share_one_refresh(db: Database, idp: OidcTestProvider, tmp_path: Path) -> None:
    uid, old = await expired_user(db, idp)
    env = broker_env(db, idp)
    replicas = [BrokerProcess(env, tmp_path / f"replica{i}.log") for i in range(2)]
    before = idp.stats()
    try:
        channels = [grpc.aio.insecure_channel(r.target) for r in replicas]
        stubs = [pb_grpc.TokenBrokerStub(c) for c in channels]
        request = pb.GetOIDCAccessTokenRequest(user_id=str(uid))
        answers = await asyncio.gather(
            *(stub.GetOIDCAccessToken(request, timeout=15) for stub in stubs for _ in range(150))
        )
        for c in channels:
            await c.close()
    finally:
        codes = [r.stop() for r in replicas]
    d = delta(before, idp.stats())
    assert d["refresh_success"] == 1
    assert d["invalid_grant"] == 0
    assert d["grants_revoked"] == 0
    per_replica = [{a.access_token for a in answers[:150]}, {a.access_token for a in answers[150:]}]
    assert per_replica[0] == per_replica[1]
    assert len(per_replica[0]) == 1
    assert old not in per_replica[0]
    assert "" not in per_replica[0]
    assert codes == [0, 0]  # SIGTERM is a clean shutdown


async def test_many_users_expired_at_once_get_one_refresh_each(db: Database, idp: OidcTestProvider) -> None:
    gate = asyncio.Semaphore(20)

    async def one() -> tuple[uuid.UUID, str]:
        async with gate:
            return await expired_user(db, idp)

    users = await asyncio.gather(*(one() for _ in range(200)))
    before = idp.stats()
    async with running_broker(broker_env(db, idp, BROKER_DB_POOL_MAX="20")) as b:
        answers = await asyncio.gather(*(b.get(uid, timeout=30) for uid, _ in users for _ in range(5)))
    d = delta(before, idp.stats())
    assert d["refresh_success"] == 200
    assert d["invalid_grant"] == 0
    by_user: dict[int, set[str]] = {}
    for i, a in enumerate(answers):
        by_user.setdefault(i // 5, set()).add(a.access_token)
    assert all(len(t) == 1 and "" not in t for t in by_user.values())


async def test_cancelled_caller_does_not_cancel_the_refresh(db: Database, idp: OidcTestProvider) -> None:
    uid, old = await expired_user(db, idp)
    async with running_broker(broker_env(db, idp)) as b:
        await warm_discovery(b)  # discovery before the fault
        idp.set_fault("ok", delay_ms=800)
        before = idp.stats()
        call = b.stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=10)
        await asyncio.sleep(0.2)
        call.cancel()  # the caller goes away mid-refresh
        with pytest.raises(asyncio.CancelledError):
            await call
        # A caller whose deadline is shorter than the refresh gets an answer in time, not a lost refresh.
        short = await b.get(uid, timeout=0.2)
        assert (short.status, short.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
        await asyncio.sleep(1.5)
        idp.set_fault("ok")
        row = await db.link(uid)
        assert row is not None
        assert row["oauth_access_token"] != old
        assert delta(before, idp.stats())["refresh_success"] == 1
        # The persisted rotated refresh token works for the next refresh.
        await db.expire(uid)
        r = await b.get(uid)
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    d = delta(before, idp.stats())
    assert (d["refresh_success"], d["invalid_grant"]) == (2, 0)


async def test_write_back_survives_a_dropped_connection(db: Database, idp: OidcTestProvider) -> None:
    uid, _old = await expired_user(db, idp)
    async with running_broker(broker_env(db, idp)) as b:
        await warm_discovery(b)  # discovery before the fault
        idp.set_fault("ok", delay_ms=700)
        before = idp.stats()
        call = asyncio.create_task(b.get(uid))
        await asyncio.sleep(0.35)  # the lock is held, the IdP is answering
        assert await kill_locked_connections(db) == 1
        r = await call
        idp.set_fault("ok")
        assert r.status == pb.TOKEN_STATUS_REFRESHED
        row = await wait_for_access_token(db, uid, r.access_token, seconds=5)
        assert row["oauth_access_token"] == r.access_token
        await db.expire(uid)
        again = await b.get(uid)
    assert again.status == pb.TOKEN_STATUS_REFRESHED
    d = delta(before, idp.stats())
    assert (d["refresh_success"], d["invalid_grant"]) == (2, 0)


async def test_write_back_is_retried_while_the_database_is_unreachable(db: Database, idp: OidcTestProvider) -> None:
    uid, _ = await expired_user(db, idp)
    async with running_broker(broker_env(db, idp, BROKER_PERSIST_RETRY_SECONDS="20")) as b:
        await warm_discovery(b)  # discovery before the fault
        idp.set_fault("ok", delay_ms=600)
        call = asyncio.create_task(b.get(uid))
        await asyncio.sleep(0.3)
        await db.set_reachable(False)  # drops the locked connection; reconnects fail for a while
        r = await call
        idp.set_fault("ok")
        assert r.status == pb.TOKEN_STATUS_REFRESHED
        assert b.sample("token_broker_refresh_unpersisted") == 1
        # While the database is down, this process keeps serving the refreshed token from memory.
        during = await b.get(uid)
        assert during.access_token == r.access_token
        await asyncio.sleep(1.0)
        await db.set_reachable(True)
        row = await wait_for_access_token(db, uid, r.access_token, seconds=10)
    assert row["oauth_access_token"] == r.access_token


async def test_idp_slower_than_the_lock_wait_starts_no_second_refresh(db: Database, idp: OidcTestProvider) -> None:
    uid, _old = await expired_user(db, idp)
    env = broker_env(db, idp, BROKER_REFRESH_LOCK_TIMEOUT="0.5", BROKER_OIDC_TIMEOUT="5")
    async with running_broker(env) as a, running_broker(env) as b:  # two replicas: separate pools and refreshers
        for r in (a, b):
            await warm_discovery(r)  # discovery before the fault
        idp.set_fault("ok", delay_ms=2000)
        before = idp.stats()
        first = asyncio.create_task(a.get(uid))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        waiter = await b.get(uid)
        waited = time.monotonic() - started
        holder = await first
    idp.set_fault("ok")
    d = delta(before, idp.stats())
    assert (d["refresh_success"], d["invalid_grant"]) == (1, 0)
    assert holder.status == pb.TOKEN_STATUS_REFRESHED
    # A lock timeout is not a credential failure: never REAUTH_REQUIRED.
    assert (waiter.status, waiter.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
    assert waited < 1.5


async def test_lock_timeout_serves_a_still_valid_token(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(minutes=2))
    env = broker_env(db, idp, BROKER_REFRESH_LOCK_TIMEOUT="0.3", BROKER_REFRESH_AHEAD="0")
    async with running_broker(env) as a, running_broker(env) as b:
        for r in (a, b):
            await warm_discovery(r)  # discovery before the fault
        idp.set_fault("ok", delay_ms=1500)
        first = asyncio.create_task(a.get(uid))
        await asyncio.sleep(0.3)
        waiter = await b.get(uid)
        await first
    idp.set_fault("ok")
    assert (waiter.status, waiter.access_token) == (pb.TOKEN_STATUS_VALID, issued.access_token)


async def test_invalid_grant_is_remembered_for_the_backoff(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    idp.refresh_directly(issued.refresh_token).raise_for_status()  # rotate: the stored one is dead
    await db.insert_link(uid, issued.access_token, issued.refresh_token, past())
    row_before = await db.link(uid)
    before = idp.stats()
    async with running_broker(broker_env(db, idp)) as b:
        first = await b.get(uid)
        rest = [await b.get(uid) for _ in range(100)]
    d = delta(before, idp.stats())
    assert (first.status, first.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert all((r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "") for r in rest)
    assert d["token_requests"] == 1
    assert await db.link(uid) == row_before  # nothing deleted, nothing changed


async def test_invalid_grant_after_someone_else_rotated_uses_the_new_state(db: Database, idp: OidcTestProvider) -> None:
    """The row's refresh token changed between the read and the IdP's rejection: the new state wins."""
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, "dead-access", "dead-refresh", past())

    async def rotate() -> None:
        await db.execute(
            "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3,"
            " oauth_expiry = now() + interval '1 hour' WHERE user_id = $1",
            uid,
            issued.access_token,
            issued.refresh_token,
        )

    async with postgres_store(db) as inner:
        store = RotatesAfterTheLock(inner, rotate)
        async with running_broker(broker_env(db, idp), store=store) as b:
            r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, issued.access_token)


class RotatesAfterTheLock:
    """A LinkStore whose lock runs `hook` right after the lock is released (another writer, on cue)."""

    def __init__(self, inner: PostgresStore, hook: Callable[[], Awaitable[None]]) -> None:
        self.inner, self.hook = inner, hook
        self.get_link, self.save_refreshed = inner.get_link, inner.save_refreshed
        self.heartbeat, self.ping, self.dbcrypt_keys = inner.heartbeat, inner.ping, inner.dbcrypt_keys
        self.note_reauth_required, self.note_recovered = inner.note_reauth_required, inner.note_recovered

    @asynccontextmanager
    async def lock_link(self, user_id: uuid.UUID, *, lock_timeout: float, hold_timeout: float) -> AsyncIterator[Any]:
        try:
            async with self.inner.lock_link(user_id, lock_timeout=lock_timeout, hold_timeout=hold_timeout) as locked:
                yield locked
        finally:
            await self.hook()


async def test_idp_outage_opens_the_circuit_and_recovers(db: Database, idp: OidcTestProvider) -> None:
    users = [await expired_user(db, idp) for _ in range(5)]
    env = broker_env(db, idp, BROKER_OIDC_TIMEOUT="0.4", BROKER_CIRCUIT_FAILURES="3", BROKER_CIRCUIT_OPEN_SECONDS="1.5")
    async with running_broker(env) as b:
        await warm_discovery(b)  # discovery before the fault
        idp.set_fault("ok", delay_ms=5000)  # hangs: each call waits out the IdP timeout
        timings = []
        for uid, _ in users[:3]:
            started = time.monotonic()
            r = await b.get(uid)
            timings.append(time.monotonic() - started)
            assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
        assert all(t < 0.9 for t in timings), timings  # within the timeout
        assert b.sample("token_broker_idp_circuit_state") == 1.0
        before = idp.stats()
        started = time.monotonic()
        fast = await b.get(users[3][0])
        assert time.monotonic() - started < 0.1  # the open circuit answers at once
        assert (fast.status, fast.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
        assert idp.stats()["token_requests"] == before["token_requests"]
        idp.set_fault("ok")
        await asyncio.sleep(1.6)
        recovered = await b.get(users[4][0])
        assert recovered.status == pb.TOKEN_STATUS_REFRESHED
        assert b.sample("token_broker_idp_circuit_state") == 0.0


async def test_hot_user_is_refreshed_ahead_without_waiting(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(seconds=630))
    async with running_broker(broker_env(db, idp, BROKER_REFRESH_AHEAD="60")) as b:
        await warm_discovery(b)  # discovery before the fault
        idp.set_fault("ok", delay_ms=500)
        started = time.monotonic()
        r = await b.get(uid)
        assert time.monotonic() - started < 0.3  # served without waiting on the slow IdP
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, issued.access_token)
        await asyncio.sleep(1.0)
        idp.set_fault("ok")
        later = await b.get(uid)
    assert later.status == pb.TOKEN_STATUS_VALID
    assert later.access_token != issued.access_token  # the background refresh landed


async def test_lock_is_released_when_the_refresh_fails(db: Database, idp: OidcTestProvider) -> None:
    uid, _ = await expired_user(db, idp)
    async with running_broker(broker_env(db, idp)) as b:
        idp.set_fault("down")
        assert (await b.get(uid)).status == pb.TOKEN_STATUS_IDP_UNAVAILABLE
        idp.set_fault("ok")
    conn = await asyncpg.connect(db.admin_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '200ms'")
            await conn.fetchrow("SELECT 1 FROM user_links WHERE user_id = $1 FOR UPDATE", uid)
    finally:
        await conn.close()


async def test_replica_waiting_on_the_lock_does_not_resend_a_token_whose_holder_lost_its_connection(
    db: Database, idp: OidcTestProvider
) -> None:
    """A's connection dies while its refresh is at the IdP; B gets the row lock at once but must not send the same
    refresh token (reuse detection would revoke the grant). A's retried write-back lands; B then serves it."""
    uid, _ = await expired_user(db, idp)
    env = broker_env(db, idp)
    async with running_broker(env) as a, running_broker(env) as b:
        for r in (a, b):
            await warm_discovery(r)  # discovery before the fault
        idp.set_fault("ok", delay_ms=800)
        before = idp.stats()
        first = asyncio.create_task(a.get(uid))
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(b.get(uid))
        await asyncio.sleep(0.2)
        assert await kill_locked_connections(db) == 1
        from_b = await waiting
        from_a = await first
        idp.set_fault("ok")
        await wait_for_access_token(db, uid, from_a.access_token, seconds=5)
        later = await b.get(uid)
    d = delta(before, idp.stats())
    assert (d["refresh_success"], d["invalid_grant"], d["grants_revoked"]) == (1, 0, 0)
    assert from_a.status == pb.TOKEN_STATUS_REFRESHED
    assert (from_b.status, from_b.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
    assert later.access_token == from_a.access_token


async def test_migrate_upgrades_the_lock_function_of_an_older_install(db: Database) -> None:
    from broker.postgres.migrate import migrate
    from tests.support.pg import SERVICE_ROLE

    await db.execute("""
        DROP FUNCTION token_broker.lock_oidc_link(uuid);
        CREATE FUNCTION token_broker.lock_oidc_link(p_user_id uuid)
        RETURNS TABLE (access_token text, refresh_token text, expiry timestamptz,
                       access_key_id text, refresh_key_id text, account_disabled boolean)
        LANGUAGE sql AS $$ SELECT '', '', now(), null::text, null::text, false $$;
    """)
    await migrate(db.admin_url, SERVICE_ROLE)
    row = await db.fetchrow(
        "SELECT pg_get_function_result('token_broker.lock_oidc_link(uuid)'::regprocedure) AS result, prosecdef"
        " FROM pg_proc WHERE oid = 'token_broker.lock_oidc_link(uuid)'::regprocedure"
    )
    assert row is not None
    assert "marker_idle_seconds" in row["result"]
    assert row["prosecdef"] is True
