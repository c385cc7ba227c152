"""WatchLinkEvents through the real server: live events, resume with a cursor after a disconnect (no gap, in
order), the cursor's errors, the watchers' allowlist, no request timeout or per-caller limit, UNAVAILABLE on SIGTERM,
ids committed out of order held back, and live delivery behind PgBouncer in transaction pooling."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from broker.client import TokenBrokerClient
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env, running_broker
from tests.support.pg import Database
from tests.support.pgbouncer import PgBouncer
from tests.support.pgbouncer import available as pgbouncer_available

WATCHER = (("authorization", "Bearer watcher-secret-token"),)
WORKER = (("authorization", "Bearer worker-secret-token"),)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "callers"
    path.write_text(
        f"watcher:{hashlib.sha256(b'watcher-secret-token').hexdigest()}\n"
        f"worker:{hashlib.sha256(b'worker-secret-token').hexdigest()}\n"
    )
    return path


def stream_env(db: Database, tokens: Path, **more: str) -> dict[str, str]:
    return broker_env(
        db,
        None,
        BROKER_CALLER_TOKENS_FILE=str(tokens),
        BROKER_EVENT_WATCHERS="token:watcher",
        BROKER_EVENT_POLL_INTERVAL="0.1",
        **more,
    )


async def ids_in_db(db: Database) -> list[int]:
    conn = await db.admin()
    try:
        return [r["id"] for r in await conn.fetch("SELECT id FROM token_broker.link_events ORDER BY id")]
    finally:
        await conn.close()


def watch(channel: grpc.aio.Channel, after: str = "", metadata: tuple[tuple[str, str], ...] = WATCHER) -> Any:
    return pb_grpc.TokenBrokerStub(channel).WatchLinkEvents(pb.WatchLinkEventsRequest(after=after), metadata=metadata)


async def take(call: Any, n: int, timeout: float = 20) -> list[pb.LinkEvent]:
    got: list[pb.LinkEvent] = []
    async with asyncio.timeout(timeout):
        async for response in call:
            got.append(response.event)
            if len(got) == n:
                break
    return got


async def wait_watching(b: Any, n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while b.sample("token_broker_event_watchers") < n:
        assert time.monotonic() < deadline, "stream not open"
        await asyncio.sleep(0.02)


async def test_live_then_resume_after_a_disconnect_misses_nothing(db: Database, tokens: Path) -> None:
    uid, other = uuid.uuid4(), uuid.uuid4()
    await db.change_link_state(uid, 2)  # before the watcher, 3 events (re-auth; recovered, re-auth): not live
    async with running_broker(stream_env(db, tokens, BROKER_REQUEST_TIMEOUT="1")) as b:
        live = watch(b.channel)
        await wait_watching(b)
        await db.change_link_state(uid, 2)  # 2 changes of a link in that state: 4 events
        first = await take(live, 4)
        assert [e.type for e in first] == ["link.recovered", "link.reauth_required"] * 2
        await asyncio.sleep(1.5)  # longer than BROKER_REQUEST_TIMEOUT: a stream has none
        await db.change_link_state(other, 1)
        fourth = await take(live, 1)
        live.cancel()  # the consumer goes away
        cursor = fourth[0].id
        await db.change_link_state(uid, 3)
        await db.change_link_state(other, 2)
        resumed = watch(b.channel, after=cursor)
        rest = await take(resumed, 6 + 4)
        resumed.cancel()
    seen = [int(e.id) for e in [*first, *fourth, *rest]]
    everything = await ids_in_db(db)
    assert seen == everything[3:]  # every event after the watcher started, once, in order
    assert {e.user_id for e in rest} == {str(uid), str(other)}
    assert all(e.occurred_at.seconds > 0 for e in rest)


async def test_cursor_errors_and_the_allowlist(db: Database, tokens: Path) -> None:
    uid = uuid.uuid4()
    await db.change_link_state(uid, 3)
    ids = await ids_in_db(db)
    async with running_broker(stream_env(db, tokens)) as b:
        for after, code in (
            ("abc", grpc.StatusCode.INVALID_ARGUMENT),
            ("-1", grpc.StatusCode.INVALID_ARGUMENT),
            (str(ids[-1] + 100), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await take(watch(b.channel, after), 1)
            assert err.value.code() is code, after
        everything = await take(watch(b.channel, "0"), len(ids))
        assert [int(e.id) for e in everything] == ids
        from_webhook_id = await take(watch(b.channel, f"evt_{ids[0]}"), len(ids) - 1)
        assert [int(e.id) for e in from_webhook_id] == ids[1:]
        conn = await asyncpg.connect(db.service_url)
        try:
            await conn.execute("SELECT token_broker.prune_link_events(0)")  # everything is past a zero retention
        finally:
            await conn.close()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await take(watch(b.channel, str(ids[0])), 1)
        assert err.value.code() is grpc.StatusCode.OUT_OF_RANGE
        last = watch(b.channel, str(ids[-1]))  # the newest pruned one is still a good cursor
        await wait_watching(b)
        await db.change_link_state(uid, 1)
        assert len(await take(last, 2)) == 2
        last.cancel()
        for metadata, code in ((WORKER, grpc.StatusCode.PERMISSION_DENIED), ((), grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await take(watch(b.channel, "", metadata), 1)
            assert err.value.code() is code
    async with running_broker(broker_env(db, BROKER_CALLER_TOKENS_FILE=str(tokens))) as nobody:
        with pytest.raises(grpc.aio.AioRpcError) as err:  # BROKER_EVENT_WATCHERS empty: nobody may watch
            await take(watch(nobody.channel), 1)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_streams_are_not_counted_against_the_per_caller_limit(db: Database, tokens: Path) -> None:
    uid = uuid.uuid4()
    async with running_broker(stream_env(db, tokens, BROKER_MAX_CONCURRENT_PER_CALLER="1")) as b:
        streams = [watch(b.channel) for _ in range(3)]
        await wait_watching(b, 3)
        await db.change_link_state(uid, 1)
        for s in streams:
            assert [e.type for e in await take(s, 1)] == ["link.reauth_required"]
            s.cancel()


async def test_an_event_committed_late_with_a_lower_id_is_not_skipped(db: Database, tokens: Path) -> None:
    slow, fast = uuid.uuid4(), uuid.uuid4()
    async with running_broker(stream_env(db, tokens)) as b:
        stream = watch(b.channel)
        await wait_watching(b)
        holder = await asyncpg.connect(db.service_url)
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT token_broker.note_reauth_required($1, $2, 'invalid_grant', false, false)", slow, os.urandom(32)
        )
        late = asyncio.create_task(db.change_link_state(fast, 1))  # another replica's event, written meanwhile
        deadline = time.monotonic() + 10
        while not await db.fetchrow("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
            assert time.monotonic() < deadline, "the second writer did not queue behind the first"
            await asyncio.sleep(0.02)
        assert not late.done()
        await tx.commit()
        await holder.close()
        await late
        got = await take(stream, 2)
        stream.cancel()
    assert [e.user_id for e in got] == [str(slow), str(fast)]
    assert int(got[0].id) < int(got[1].id)


async def test_sigterm_ends_the_stream_with_unavailable(db: Database, tokens: Path, tmp_path: Path) -> None:
    b = BrokerProcess(stream_env(db, tokens, BROKER_WORKERS="2"), tmp_path / "b.log")
    try:
        async with grpc.aio.insecure_channel(b.target) as channel:
            stream = watch(channel)
            await db.change_link_state(uuid.uuid4(), 1)
            await take(stream, 1)
            os.kill(b.proc.pid, signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await take(stream, 1)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        b.stop()


@pytest.fixture
def bouncer(db: Database) -> Iterator[PgBouncer]:
    if not pgbouncer_available():
        pytest.fail("pgbouncer is not installed (`make test` installs Debian's package)")
    p = PgBouncer(db.admin_url, db.name, ["token_broker", "postgres"])
    yield p
    p.stop()


async def test_live_events_behind_pgbouncer_in_transaction_pooling(
    db: Database, tokens: Path, bouncer: PgBouncer
) -> None:
    env = stream_env(db, tokens, BROKER_DATABASE_URL=bouncer.url(db.service_url), BROKER_DB_STATEMENT_CACHE="false")
    async with running_broker(env) as b:
        stream = watch(b.channel)
        await wait_watching(b)
        await db.change_link_state(uuid.uuid4(), 3)
        got = await take(stream, 5)
        stream.cancel()
    assert [int(e.id) for e in got] == await ids_in_db(db)


async def test_the_python_helper_resumes_across_a_broker_restart(db: Database, tokens: Path, tmp_path: Path) -> None:
    uid = uuid.uuid4()
    await db.change_link_state(uid, 1)
    first = BrokerProcess(stream_env(db, tokens), tmp_path / "a.log")
    port = first.port
    second: BrokerProcess | None = None
    got: list[pb.LinkEvent] = []
    try:
        async with TokenBrokerClient(first.target, caller_token="watcher-secret-token") as client:
            events = client.watch_link_events(after="0")
            async with asyncio.timeout(60):
                got.append(await anext(events))
                await db.change_link_state(uid, 1)
                got.append(await anext(events))
                os.kill(first.proc.pid, signal.SIGTERM)  # the stream ends UNAVAILABLE; the helper reconnects
                first.proc.wait(timeout=15)
                await db.change_link_state(uid, 2)  # while no broker runs
                second = BrokerProcess(stream_env(db, tokens), tmp_path / "b.log", port=port)
                while len(got) < 1 + 2 + 4:
                    got.append(await anext(events))
            await events.aclose()
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert [int(e.id) for e in got] == await ids_in_db(db)  # across the restart: no gap, no repeat
