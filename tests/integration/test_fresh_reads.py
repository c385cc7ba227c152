"""No stale answers under load: a change committed before a request starts is what that request sees, even while
hundreds of other calls keep every read connection busy and the reads are batched."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import RunningBroker, broker_env, running_broker
from tests.support.pg import Database


async def _load(b: RunningBroker, users: list[uuid.UUID], stop: asyncio.Event) -> int:
    calls = 0
    while not stop.is_set():
        await asyncio.gather(*(b.get(u) for u in users))
        calls += len(users)
    return calls


async def test_a_replaced_token_is_seen_by_the_next_request_under_load(db: Database) -> None:
    expiry = datetime.now(UTC) + timedelta(hours=1)
    target = uuid.uuid4()
    await db.insert_link(target, "token-0", "ref", expiry)
    others = [uuid.uuid4() for _ in range(50)]
    for u in others:
        await db.insert_link(u, f"other-{u}", "ref", expiry)
    async with running_broker(broker_env(db)) as b:
        stop = asyncio.Event()
        load = [asyncio.create_task(_load(b, [*others, target], stop)) for _ in range(6)]  # ~300 in flight
        try:
            for i in range(1, 31):
                await db.execute(
                    "UPDATE user_links SET oauth_access_token = $2 WHERE user_id = $1", target, f"token-{i}"
                )
                r = await b.get(target)  # starts after the commit
                assert r.access_token == f"token-{i}"
        finally:
            stop.set()
            calls = await asyncio.gather(*load)
    assert sum(calls) > 300  # the reads really ran under load


async def test_a_suspended_user_is_refused_by_the_next_request_under_load(product_db: Database) -> None:
    expiry = datetime.now(UTC) + timedelta(hours=1)
    users = [uuid.uuid4() for _ in range(40)]
    for n, u in enumerate(users):
        await product_db.execute(
            "INSERT INTO users (id, email, username) VALUES ($1, $2, $3)", u, f"u{n}@example.com", f"u{n}"
        )
        await product_db.insert_link(u, f"token-{n}", "ref", expiry)
    target = users[0]
    async with running_broker(broker_env(product_db)) as b:
        stop = asyncio.Event()
        load = [asyncio.create_task(_load(b, users[1:], stop)) for _ in range(6)]
        try:
            for _ in range(10):
                await product_db.execute("UPDATE users SET status = 'suspended' WHERE id = $1", target)
                assert (await b.get(target)).status == pb.TOKEN_STATUS_ACCOUNT_DISABLED
                await product_db.execute("UPDATE users SET status = 'active' WHERE id = $1", target)
                assert (await b.get(target)).status == pb.TOKEN_STATUS_VALID
        finally:
            stop.set()
            await asyncio.gather(*load)
