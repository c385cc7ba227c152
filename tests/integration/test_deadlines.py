"""Every wait of a call is bounded by its budget: the read and the refresh share one, and OIDC discovery has one."""

from __future__ import annotations

import asyncio
import time
import uuid

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import running_broker
from tests.support.pg import Database
from tests.support.token_endpoint import TokenEndpoint, env_for, expired_user


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
