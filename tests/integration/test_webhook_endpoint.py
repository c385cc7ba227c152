"""The webhook endpoint's life with a real receiver (standardwebhooks verifies each delivery): 410 stops it in the
database for every replica until the URL changes; the retry period ends in failed + ERROR + counted, and the user's
next events go on; the retention never deletes what is still to be delivered; the metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import asyncpg
import httpx2
import pytest

from broker.postgres.embedded import free_port
from tests.support.broker import ROOT, broker_env, running_broker
from tests.support.pg import Database
from tests.support.processes import terminate
from tests.support.webhooks import Receiver, new_secret


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def hook_env(db: Database, receiver: Receiver, **more: str) -> dict[str, str]:
    return broker_env(
        db,
        None,
        BROKER_WEBHOOK_URL=receiver.url,
        BROKER_WEBHOOK_SECRET=receiver.secret,
        BROKER_EVENT_POLL_INTERVAL="0.1",
        **more,
    )


async def states(db: Database) -> list[str]:
    conn = await db.admin()
    try:
        return [r["webhook"] for r in await conn.fetch("SELECT webhook FROM token_broker.link_events ORDER BY id")]
    finally:
        await conn.close()


async def until(check: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_410_stops_the_endpoint_for_every_replica_until_the_url_changes(
    db: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.mode = "gone"
    uid = uuid.uuid4()
    await db.change_link_state(uid, webhook=True)
    async with running_broker(hook_env(db, receiver)) as b:
        await until(lambda: db.fetchrow("SELECT 1 FROM token_broker.webhook_endpoint WHERE stopped_at IS NOT NULL"))
        await until(lambda: b.sample("token_broker_webhook_deliveries_total", result="gone") == 1)
        await db.change_link_state(uid, webhook=True)
    assert any(r.levelno == logging.ERROR and "410" in r.getMessage() for r in caplog.records)
    attempts = receiver.attempts
    receiver.mode = "ok"
    async with running_broker(hook_env(db, receiver)):  # another replica, the same URL: stays stopped
        await asyncio.sleep(1.0)  # several polls; nothing may go out (the assertion below is on the outcome)
    assert receiver.attempts == attempts
    assert await states(db) == ["pending"] * 3
    moved = Receiver().start()
    try:
        async with running_broker(hook_env(db, moved)):  # a new URL: delivery resumes, everything waited
            got = await asyncio.to_thread(moved.wait_for, 3, 20)
            await until(lambda: _all_delivered(db))
    finally:
        moved.stop()
    assert [e["type"] for e in got] == ["link.reauth_required", "link.recovered", "link.reauth_required"]


async def _all_delivered(db: Database) -> bool:
    return set(await states(db)) == {"delivered"}


async def test_past_the_retry_period_an_event_fails_loudly_and_the_next_ones_go_on(
    db: Database, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.mode = "fail"
    uid = uuid.uuid4()
    async with running_broker(hook_env(db, receiver, BROKER_WEBHOOK_RETRY_PERIOD="1")) as b:
        await db.change_link_state(uid, webhook=True)  # re-auth required: never accepted within the retry period
        await until(lambda: b.sample("token_broker_webhook_deliveries_total", result="failed") == 1)
        assert b.sample("token_broker_webhook_deliveries_total", result="retry") >= 1
        receiver.mode = "ok"
        await db.change_link_state(
            uid, webhook=True
        )  # recovered, re-auth required: the user's next events are not held up
        got = await asyncio.to_thread(receiver.wait_for, 2, 20)
        await until(lambda: b.sample("token_broker_webhook_deliveries_total", result="delivered") == 2)
    assert await states(db) == ["failed", "delivered", "delivered"]
    assert [e["type"] for e in got] == ["link.recovered", "link.reauth_required"]
    failed = [r for r in caplog.records if r.levelno == logging.ERROR and "failed for good" in r.getMessage()]
    assert len(failed) == 1


async def test_retention_keeps_what_a_webhook_has_still_to_deliver(db: Database, receiver: Receiver) -> None:
    receiver.stop()
    delivered, waiting = uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(db.service_url)
    try:
        await conn.execute(
            "SELECT token_broker.note_reauth_required($1, $2, 'invalid_grant', false, false)", delivered, b"x"
        )
        await db.change_link_state(waiting, webhook=True)
        assert await conn.fetchval("SELECT token_broker.prune_link_events(0)") == 1
        assert await conn.fetchval("SELECT token_broker.link_events_backlog()") > 0
    finally:
        await conn.close()
    assert await states(db) == ["pending"]


async def test_the_backlog_age_is_a_gauge_of_the_oldest_undelivered_event(db: Database, receiver: Receiver) -> None:
    receiver.stop()
    await db.change_link_state(uuid.uuid4(), webhook=True)
    async with running_broker(hook_env(db, receiver)) as b:
        await until(lambda: b.sample("token_broker_webhook_oldest_undelivered_seconds") > 0)
        receiver.start()
        await until(lambda: _all_delivered(db), timeout=30)
        await until(lambda: b.sample("token_broker_webhook_oldest_undelivered_seconds") == 0, timeout=15)


async def test_the_example_receiver_prints_verified_events_and_refuses_forgeries(db: Database) -> None:
    secret = new_secret()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "webhook_receiver.py"), "--port", str(port)],
        env={**os.environ, "WEBHOOK_SECRET": secret},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(await asyncio.to_thread(proc.stdout.readline)) == {"listening": port}
        url = f"http://127.0.0.1:{port}/hook"
        forged = httpx2.post(
            url,
            content=b'{"type":"link.recovered"}',
            headers={"webhook-id": "evt_1", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,AAAA"},
            timeout=5,
        )
        assert forged.status_code == 400
        uid = uuid.uuid4()
        env = broker_env(db, None, BROKER_WEBHOOK_URL=url, BROKER_WEBHOOK_SECRET=secret)
        async with running_broker(env):
            await db.change_link_state(uid, webhook=True)
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=20)
    finally:
        terminate(proc)
    event = json.loads(line)
    assert event["webhook_id"].startswith("evt_")
    assert (event["type"], event["data"]["user_id"], event["data"]["error"]) == (
        "link.reauth_required",
        str(uid),
        "invalid_grant",
    )
