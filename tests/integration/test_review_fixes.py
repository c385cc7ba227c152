"""The security review's findings (#16), each against real PostgreSQL and a real HTTP token endpoint of the tests'
own (tests/support/token_endpoint.py) where oidc-provider cannot give the answer on cue."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from broker.errors import StoreUnavailable
from broker.postgres.store import PostgresStore
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import broker_env, postgres_store, running_broker
from tests.support.pg import SERVICE_ROLE, Database
from tests.support.proxy import proxied
from tests.support.token_endpoint import Scripted, TokenEndpoint


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    ep = TokenEndpoint()
    yield ep
    ep.close()


def env_for(db: Database, ep: TokenEndpoint, **overrides: str) -> dict[str, str]:
    env = broker_env(db, BROKER_OIDC_ISSUER=ep.issuer, BROKER_OIDC_CLIENT_ID="broker")
    env.update(BROKER_OIDC_CLIENT_SECRET="test-secret", **overrides)
    return env


async def expired_user(db: Database, ep: TokenEndpoint) -> tuple[uuid.UUID, str]:
    uid = uuid.uuid4()
    access, refresh = ep.issue()
    await db.insert_link(uid, access, refresh, datetime.now(UTC) - timedelta(minutes=5))
    return uid, refresh


async def marker(db: Database, uid: uuid.UUID) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM token_broker.refresh_in_flight WHERE user_id = $1", uid)


# -- 2. nothing after the IdP's answer can drop the rotation ------------------------------------------------------


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
    assert await marker(db, uid) is None
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
        assert await marker(db, uid) is not None
        soon = await b.get(uid)
        assert soon.status == pb.TOKEN_STATUS_IDP_UNAVAILABLE
        assert endpoint.sent == [old_refresh]
        await asyncio.sleep(2.3)  # the marker's heartbeat is dead (BROKER's holder_dead_after is 2 s)
        later = await b.get(uid)
    assert later.status == pb.TOKEN_STATUS_REFRESHED
    assert endpoint.sent == [old_refresh, old_refresh]
    assert endpoint.reused == 0


# -- 6. a stale write-back never lifts another holder's marker ----------------------------------------------------


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
    assert await marker(db, uid) is not None


# -- 8. only invalid_grant (and client errors) are rejections -----------------------------------------------------


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
        assert await marker(db, uid) is None  # not rotated: the marker is lifted
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


# -- 10. a token shorter-lived than the leeway is not refreshed on every request ----------------------------------


async def test_a_300_second_token_under_the_600_second_leeway_is_refreshed_once(
    db: Database, endpoint: TokenEndpoint
) -> None:
    endpoint.expires_in = 300
    uid, _ = await expired_user(db, endpoint)
    async with running_broker(env_for(db, endpoint)) as b:
        answers = [await b.get(uid) for _ in range(5)]
    assert endpoint.grants == 1
    assert [a.status for a in answers] == [pb.TOKEN_STATUS_REFRESHED] + [pb.TOKEN_STATUS_VALID] * 4


# -- 11. one budget for the read and the refresh ------------------------------------------------------------------


async def test_a_slow_read_leaves_less_time_for_the_refresh_wait(db: Database, endpoint: TokenEndpoint) -> None:
    uid, _ = await expired_user(db, endpoint)
    endpoint.token_delay = 3.0
    async with running_broker(env_for(db, endpoint)) as b:
        admin = await db.admin()
        try:
            tx = admin.transaction()
            await tx.start()
            await admin.execute("LOCK TABLE user_links IN ACCESS EXCLUSIVE MODE")  # the read waits 0.6 s

            async def release() -> None:
                await asyncio.sleep(0.6)
                await tx.rollback()

            releasing = asyncio.create_task(release())
            started = time.monotonic()
            r = await b.get(uid, timeout=1.0)
            elapsed = time.monotonic() - started
            await releasing
        finally:
            await admin.close()
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")  # an answer, not DEADLINE_EXCEEDED
    assert elapsed < 1.0


# -- 13. the service role cannot hold product rows forever --------------------------------------------------------


async def test_migrate_bounds_the_service_roles_transactions(db: Database) -> None:
    row = await db.fetchrow(
        "SELECT setconfig FROM pg_db_role_setting WHERE setrole = $1::regrole AND setdatabase = 0", SERVICE_ROLE
    )
    assert row is not None
    assert {"idle_in_transaction_session_timeout=60s", "statement_timeout=30s"} <= set(row["setconfig"])


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


# -- 15. discovery has a deadline ---------------------------------------------------------------------------------


async def test_a_hanging_discovery_is_bounded_by_the_idp_timeout(db: Database, endpoint: TokenEndpoint) -> None:
    """Three users at once: each waits for discovery (behind one lock) within the IdP timeout as a whole."""
    users = [(await expired_user(db, endpoint))[0] for _ in range(3)]
    endpoint.discovery_delay = 3.0
    async with running_broker(env_for(db, endpoint, BROKER_OIDC_TIMEOUT="0.5")) as b:

        async def timed(uid: uuid.UUID) -> tuple[int, float]:
            started = time.monotonic()
            r = await b.get(uid)
            return r.status, time.monotonic() - started

        results = await asyncio.gather(*(timed(u) for u in users))
    assert {status for status, _ in results} == {pb.TOKEN_STATUS_IDP_UNAVAILABLE}
    assert max(elapsed for _, elapsed in results) < 0.9, results


# -- 7 and 3. a silent network in the middle of the locked transaction --------------------------------------------


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


# -- 5. a holder with unwritten rotated tokens keeps its marker alive ---------------------------------------------


class SavesFail:
    """A LinkStore over the real one whose writes of refreshed tokens fail while `failing` (a holder whose writes
    keep failing while its heartbeat still reaches the database)."""

    def __init__(self, inner: PostgresStore) -> None:
        self.inner = inner
        self.failing = True
        self.get_link, self.heartbeat, self.ping = inner.get_link, inner.heartbeat, inner.ping
        self.dbcrypt_keys = inner.dbcrypt_keys
        self.note_reauth_required, self.note_recovered = inner.note_reauth_required, inner.note_recovered

    async def save_refreshed(self, *args: Any, **kwargs: Any) -> bool:
        if self.failing:
            raise StoreUnavailable("test: writes fail")
        return await self.inner.save_refreshed(*args, **kwargs)

    @asynccontextmanager
    async def lock_link(self, user_id: uuid.UUID, *, lock_timeout: float, hold_timeout: float) -> AsyncIterator[Any]:
        async with self.inner.lock_link(user_id, lock_timeout=lock_timeout, hold_timeout=hold_timeout) as locked:
            yield _FailingSave(locked, self)


class _FailingSave:
    def __init__(self, inner: Any, store: SavesFail) -> None:
        self.inner, self.store, self.link = inner, store, inner.link
        self.mark_in_flight, self.clear_in_flight = inner.mark_in_flight, inner.clear_in_flight

    async def save(self, tokens: Any) -> bool:
        if self.store.failing:
            raise StoreUnavailable("test: writes fail")
        return bool(await self.inner.save(tokens))


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


# -- 4 and 16. tokens held for write-back are never traded for the consumed refresh token, nor served after a login --


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


# -- 14. shutdown gives unwritten tokens a last write ---------------------------------------------------------------


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
