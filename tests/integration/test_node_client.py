"""The Node.js/TypeScript client module (clients/node) against a real broker, through node's own test runner."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

from tests.support.broker import ROOT, broker_env, running_broker
from tests.support.pg import Database


async def test_the_node_client_against_the_broker(db: Database) -> None:
    valid, nolink = uuid.uuid4(), uuid.uuid4()
    await db.insert_link(valid, "node-valid-token", "", datetime.now(UTC) + timedelta(hours=1))
    await db.insert_link(nolink, "", "", None, login_type="password")
    async with running_broker(broker_env(db)) as b:
        env = dict(
            os.environ,
            TB_TARGET=b.target,
            TB_VALID_USER=str(valid),
            TB_VALID_TOKEN="node-valid-token",
            TB_NOLINK_USER=str(nolink),
        )
        out = await asyncio.to_thread(
            subprocess.run,
            ["node", "--test"],
            cwd=ROOT / "clients" / "node",
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "# pass 3" in out.stdout
    assert "# skipped 1" in out.stdout  # the audience-bound test: tests/integration/test_exchange.py runs it
