"""Link events (issue 25) against the real thing: brokers as processes with workers, the real test IdP, a real HTTP
receiver that verifies every signature with the `standardwebhooks` library. One event per state change of a link,
written with the state; the recorded state answers REAUTH_REQUIRED everywhere at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx2
import pytest

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env
from tests.support.idp import CLIENT_SECRET, OidcTestProvider
from tests.support.pg import Database
from tests.support.webhooks import Receiver


def past() -> datetime:
    return datetime.now(UTC) - timedelta(minutes=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def webhook_env(db: Database, idp: OidcTestProvider, receiver: Receiver, **more: str) -> dict[str, str]:
    return broker_env(
        db,
        idp,
        BROKER_WEBHOOK_URL=receiver.url,
        BROKER_WEBHOOK_SECRET=receiver.secret,
        BROKER_WEBHOOK_TIMEOUT="1",
        **more,
    )


async def events_of(db: Database, user_id: uuid.UUID | None = None) -> list[tuple[int, str, str]]:
    """(id, type, webhook state) of the outbox rows, in id order."""
    conn = await db.admin()
    try:
        rows = await conn.fetch(
            "SELECT id, type, webhook FROM token_broker.link_events WHERE $1::uuid IS NULL OR user_id = $1 ORDER BY id",
            user_id,
        )
    finally:
        await conn.close()
    return [(r["id"], r["type"], r["webhook"]) for r in rows]


async def wait_until_settled(db: Database, count: int, timeout: float) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await events_of(db)
        if len(rows) >= count and all(state == "delivered" for _, _, state in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"not all delivered: {rows}")
        await asyncio.sleep(0.1)


async def stampede(targets: list[str], user_id: uuid.UUID, calls: int) -> Counter[str]:
    """`calls` concurrent GetOIDCAccessToken over many connections (so every worker of every broker gets some)."""
    channels = [
        grpc.aio.insecure_channel(targets[i % len(targets)], options=[("grpc.use_local_subchannel_pool", 1)])
        for i in range(40)
    ]
    try:
        stubs = [pb_grpc.TokenBrokerStub(c) for c in channels]
        await asyncio.gather(*(c.channel_ready() for c in channels))

        async def one(i: int) -> str:
            r = await stubs[i % len(stubs)].GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(user_id)), timeout=30
            )
            return str(pb.TokenStatus.Name(r.status))

        return Counter(await asyncio.gather(*(one(i) for i in range(calls))))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def test_a_dead_link_under_a_stampede_over_two_brokers_of_two_workers_is_one_event(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "expired-access", f"dead-refresh-{uid}", past())  # the IdP never issued it
    before = idp.stats()
    brokers = [
        BrokerProcess(webhook_env(db, idp, receiver, BROKER_WORKERS="2"), tmp_path / f"b{i}.log") for i in range(2)
    ]
    try:
        answers = await stampede([b.target for b in brokers], uid, 200)
        assert answers == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 200}), answers
        # Known dead from now on: more calls answer at once, and the token is never sent again.
        again = await stampede([b.target for b in brokers], uid, 100)
        assert again == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 100}), again
        got = receiver.wait_for(1, timeout=30)
        rows = await wait_until_settled(db, 1, timeout=30)
    finally:
        for b in brokers:
            b.stop()
    assert [(t, s) for _, t, s in rows] == [("link.reauth_required", "delivered")]
    assert [(e["type"], e["user_id"], e["error"], e["forced"]) for e in got] == [
        ("link.reauth_required", str(uid), "invalid_grant", False)
    ]
    after = idp.stats()
    assert after["invalid_grant"] - before["invalid_grant"] == 1  # sent once, across 2 brokers x 2 workers
    assert receiver.rejected_signatures == 0


async def relogin(db: Database, idp: OidcTestProvider, uid: uuid.UUID) -> str:
    """The user logs in again: the product writes the new tokens over the link."""
    issued = await idp.login(f"user-{uid}")
    await db.execute(
        "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3, oauth_expiry = $4"
        " WHERE user_id = $1 AND login_type = 'oidc'",
        uid,
        issued.access_token,
        issued.refresh_token,
        datetime.now(UTC) + timedelta(seconds=issued.expires_in),
    )
    return issued.access_token


async def test_a_new_login_is_one_recovered_event_seen_by_every_replica(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "expired-access", f"dead-refresh-{uid}", past())
    brokers = [
        BrokerProcess(webhook_env(db, idp, receiver, BROKER_WORKERS="2"), tmp_path / f"b{i}.log") for i in range(2)
    ]
    try:
        assert await stampede([b.target for b in brokers], uid, 20) == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 20})
        await relogin(db, idp, uid)
        answers = await stampede([b.target for b in brokers], uid, 200)
        assert answers == Counter({"TOKEN_STATUS_VALID": 200}), answers
        got = receiver.wait_for(2, timeout=30)
        rows = await wait_until_settled(db, 2, timeout=30)
    finally:
        for b in brokers:
            b.stop()
    assert [t for _, t, _ in rows] == ["link.reauth_required", "link.recovered"]
    assert [(e["type"], e.get("recovered_by")) for e in got] == [
        ("link.reauth_required", None),
        ("link.recovered", "login"),
    ]


async def kill_link(db: Database, uid: uuid.UUID, n: int) -> None:
    """Give the link new tokens (a new login) that are dead at once: its next refresh is rejected."""
    await db.execute(
        "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3, oauth_expiry = $4"
        " WHERE user_id = $1 AND login_type = 'oidc'",
        uid,
        f"expired-access-{n}",
        f"dead-refresh-{uid}-{n}",
        past(),
    )


async def test_a_receiver_down_for_25s_then_back_gets_every_event_in_order_per_user(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.stop()  # down: connection refused
    users = [uuid.uuid4() for _ in range(3)]
    for uid in users:
        await db.insert_link(uid, "expired-access", f"dead-refresh-{uid}", past())
    b = BrokerProcess(webhook_env(db, idp, receiver, BROKER_WORKERS="2"), tmp_path / "b.log")
    try:
        down_since = time.monotonic()
        for n in range(3):
            for uid in users:
                if n:
                    await kill_link(db, uid, n)  # a new login that dies again: recovered, then re-auth required
                assert await stampede([b.target], uid, 10) == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 10})
        expected = await events_of(db)
        assert len(expected) == 3 * 5
        while time.monotonic() - down_since < 25:
            await asyncio.sleep(0.5)
        assert receiver.received() == []
        back = time.monotonic()
        receiver.start()
        got = receiver.wait_for(len(expected), timeout=60)
        last = time.monotonic() - back
        rows = await wait_until_settled(db, len(expected), timeout=30)
    finally:
        b.stop()
    assert sorted(int(e["id"]) for e in got) == [i for i, _, _ in rows]  # every one, none twice
    for uid in users:
        mine = [(int(e["id"]), e["type"]) for e in got if e["user_id"] == str(uid)]
        assert mine == [(i, t) for i, t, _ in await events_of(db, uid)]  # in order per user
        assert [t for _, t in mine] == ["link.reauth_required", *(["link.recovered", "link.reauth_required"] * 2)]
    by_id: dict[str, bytes] = {}
    for d in receiver.received():  # a retried event is the same event: same id, same body
        assert by_id.setdefault(d.msg_id, d.raw) == d.raw
    assert receiver.max_concurrent_per_user == 1
    assert receiver.rejected_signatures == 0
    print(f"outage 25s: all {len(got)} events delivered {last:.1f}s after the receiver came back")


async def test_a_broker_killed_while_delivering_is_taken_over_by_the_survivor(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.mode = "hang"  # the first attempt never gets an answer
    uid = uuid.uuid4()
    await db.insert_link(uid, "expired-access", f"dead-refresh-{uid}", past())
    a = BrokerProcess(webhook_env(db, idp, receiver), tmp_path / "a.log")
    survivor: BrokerProcess | None = None
    try:
        assert await stampede([a.target], uid, 5) == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 5})
        deadline = time.monotonic() + 20
        while receiver.attempts == 0:  # a has claimed the event and is sending it
            assert time.monotonic() < deadline, "no delivery attempt"
            await asyncio.sleep(0.05)
        survivor = BrokerProcess(webhook_env(db, idp, receiver), tmp_path / "b.log")
        a.kill()
        killed = time.monotonic()
        receiver.mode = "ok"
        receiver.release()
        got = receiver.wait_for(1, timeout=30)
        took = time.monotonic() - killed
        await wait_until_settled(db, 1, timeout=10)
    finally:
        a.stop()
        if survivor is not None:
            survivor.stop()
    assert [(e["type"], e["user_id"]) for e in got] == [("link.reauth_required", str(uid))]
    print(f"claim of a SIGKILLed broker taken over; delivered {took:.1f}s after the kill")


async def test_outages_open_circuits_and_invalid_client_emit_nothing_and_record_no_state(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "expired-access", f"dead-refresh-{uid}", past())
    idp.set_fault("down")
    b = BrokerProcess(webhook_env(db, idp, receiver, BROKER_CIRCUIT_FAILURES="2"), tmp_path / "b.log")
    try:
        answers: Counter[str] = Counter()
        for _ in range(6):  # outages, then the circuit opens
            answers += await stampede([b.target], uid, 3)
        assert answers == Counter({"TOKEN_STATUS_IDP_UNAVAILABLE": 18}), answers
    finally:
        b.stop()
        idp.set_fault("ok")
    wrong = webhook_env(db, idp, receiver, BROKER_OIDC_CLIENT_SECRET="not-the-secret")
    c = BrokerProcess(wrong, tmp_path / "c.log")
    try:  # invalid_client: today's answer and back-off, and no state: the next broker with the right secret tries
        assert await stampede([c.target], uid, 3) == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 3})
    finally:
        c.stop()
    assert await events_of(db) == []
    assert await db.fetchrow("SELECT * FROM token_broker.link_state") is None
    assert "circuit" in (tmp_path / "b.log").read_text()
    await asyncio.sleep(0)
    assert receiver.attempts == 0


async def test_no_token_or_secret_in_any_event_log_line_or_metric(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    uid = uuid.uuid4()
    first = await idp.login(f"user-{uid}")
    assert idp.refresh_directly(first.refresh_token).status_code == 200  # rotated elsewhere: the stored one is dead
    await db.insert_link(uid, first.access_token, first.refresh_token, past())
    env = webhook_env(db, idp, receiver, BROKER_WORKERS="2", BROKER_LOG_LEVEL="DEBUG")
    b = BrokerProcess(env, tmp_path / "b.log", metrics=True)
    try:
        assert await stampede([b.target], uid, 20) == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 20})
        second = await relogin(db, idp, uid)
        assert await stampede([b.target], uid, 20) == Counter({"TOKEN_STATUS_VALID": 20})
        receiver.wait_for(2, timeout=30)
        await wait_until_settled(db, 2, timeout=30)
        deadline = time.monotonic() + 10
        while 'token_broker_webhook_deliveries_total{result="delivered"} 2.0' not in (metrics := scrape(b)):
            assert time.monotonic() < deadline, metrics
            await asyncio.sleep(0.2)
    finally:
        b.stop()
    link = await db.link(uid)
    assert link is not None
    secrets = {
        first.access_token,
        first.refresh_token,
        second,
        link["oauth_refresh_token"],
        CLIENT_SECRET,
        receiver.secret,
        receiver.secret.removeprefix("whsec_"),
    }
    outbox = await db.fetchrow(
        "SELECT string_agg(detail::text || type || user_id::text, ' ') AS all FROM token_broker.link_events"
    )
    assert outbox is not None
    sent = " ".join(d.raw.decode() + str(d.headers) for d in receiver.received())
    for place, text in (
        ("log", (tmp_path / "b.log").read_text()),
        ("metrics", metrics),
        ("webhook", sent),
        ("outbox", outbox["all"]),
    ):
        for secret in secrets:
            assert secret not in text, f"a secret in the {place}"
    assert 'token_broker_link_events_total{type="link.reauth_required"} 1.0' in metrics
    assert 'token_broker_link_events_total{type="link.recovered"} 1.0' in metrics


def scrape(b: BrokerProcess) -> str:
    return httpx2.get(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5).text


async def test_a_broker_killed_right_after_deciding_delivers_after_its_restart(
    db: Database, idp: OidcTestProvider, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.stop()  # nothing can be delivered before the kill
    uid = uuid.uuid4()
    await db.insert_link(uid, "expired-access", f"dead-refresh-{uid}", past())
    a = BrokerProcess(webhook_env(db, idp, receiver), tmp_path / "a.log")
    try:
        assert await stampede([a.target], uid, 3) == Counter({"TOKEN_STATUS_REAUTH_REQUIRED": 3})
    finally:
        a.kill()
        a.stop()  # closes its log
    assert [t for _, t, _ in await events_of(db)] == ["link.reauth_required"]  # committed with the decision
    receiver.start()
    restarted = BrokerProcess(webhook_env(db, idp, receiver), tmp_path / "a2.log")
    try:
        got = receiver.wait_for(1, timeout=30)
        await wait_until_settled(db, 1, timeout=10)
    finally:
        restarted.stop()
    assert [(e["type"], e["user_id"]) for e in got] == [("link.reauth_required", str(uid))]
