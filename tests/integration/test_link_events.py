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
import pytest

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env
from tests.support.idp import OidcTestProvider
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
