"""Webhook delivery latency to a live receiver: `python -m bench.webhook_latency`. Two brokers with two workers each,
a receiver that verifies every signature (standardwebhooks); N dead links are called one every 50 ms; the latency of
an event is its arrival at the receiver minus its occurred_at (the database's clock, on this machine). Prints p50,
p99 and max."""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.integration.test_link_events import stampede
from tests.support.broker import BrokerProcess, broker_env
from tests.support.idp import OidcTestProvider
from tests.support.pg import DatabaseFactory, PgServer
from tests.support.webhooks import Receiver


async def main(count: int) -> None:
    server = PgServer()
    factory = DatabaseFactory(server)
    idp = OidcTestProvider()
    receiver = Receiver().start()
    tmp = Path(tempfile.mkdtemp(prefix="tb-hook-"))
    try:
        db = await factory.create("plain")
        users = [uuid.uuid4() for _ in range(count)]
        for uid in users:
            await db.insert_link(uid, "expired", f"dead-{uid}", datetime.now(UTC) - timedelta(minutes=5))
        env = broker_env(
            db, idp, BROKER_WEBHOOK_URL=receiver.url, BROKER_WEBHOOK_SECRET=receiver.secret, BROKER_WORKERS="2"
        )
        brokers = [BrokerProcess(env, tmp / f"b{i}.log") for i in range(2)]
        try:
            for i, uid in enumerate(users):
                await stampede([brokers[i % 2].target], uid, 2)
                await asyncio.sleep(0.05)
            events = await asyncio.to_thread(receiver.wait_for, count, 60)
        finally:
            for b in brokers:
                b.stop()
        arrived = {d.body["data"]["id"]: d.received for d in receiver.received()}
        latencies = sorted(
            arrived[e["id"]] - datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00")).timestamp()
            for e in events
        )
        q = statistics.quantiles(latencies, n=100)
        print(
            f"{count} events: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
        )
    finally:
        receiver.stop()
        idp.close()
        await factory.drop_all()
        server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
