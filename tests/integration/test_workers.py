"""BROKER_WORKERS > 1: one supervisor, several workers on one port. Calls over separate connections reach every
worker; one scrape sees them all; SIGTERM stops them all at once; readiness covers every worker; a dead worker is
restarted; refresh safety holds across workers as across replicas."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database


def workers_of(b: BrokerProcess) -> list[int]:
    children = Path(f"/proc/{b.proc.pid}/task/{b.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def audit_workers(log: Path) -> set[int]:
    found = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("audit"):
                found.add(entry["worker"])
    return found


def new_connection(target: str) -> grpc.Channel:
    """A channel with its own connection (not shared with other channels of this process)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def serving(target: str) -> bool | None:
    """The token service's readiness as the worker this new connection reached answers it; None when the call
    failed (a connection queued on a worker that was just killed is reset)."""
    with new_connection(target) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="broker.v1.TokenBroker"), timeout=2
            )
        except grpc.RpcError:
            return None
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


async def test_workers_share_the_port_and_one_scrape_counts_every_call(db: Database, tmp_path: Path) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    b = BrokerProcess(broker_env(db, BROKER_WORKERS="2"), tmp_path / "b.log", metrics=True)
    try:
        assert len(workers_of(b)) == 2
        calls = 0
        for _ in range(40):
            with new_connection(b.target) as ch:
                r = pb_grpc.TokenBrokerStub(ch).GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)))
                assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "tok")
                calls += 1
            if calls >= 10 and audit_workers(b.log_path) == {0, 1}:
                break
        assert audit_workers(b.log_path) == {0, 1}  # both workers answered
        import httpx2
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx2.get(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5).text
        valid = next(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "token_broker_token_requests_total" and s.labels == {"status": "valid"}
        )
        assert valid == calls  # one scrape, every worker's calls
    finally:
        assert b.stop() == 0


async def test_sigterm_stops_every_worker_at_once(db: Database, tmp_path: Path) -> None:
    b = BrokerProcess(broker_env(db, BROKER_WORKERS="2", BROKER_SHUTDOWN_GRACE="5"), tmp_path / "b.log")
    workers = workers_of(b)
    started = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 5  # nothing in flight: no need to wait out the grace
    assert not any(alive(pid) for pid in workers)
    b.stop()


async def test_readiness_covers_every_worker_and_a_dead_worker_is_restarted(db: Database, tmp_path: Path) -> None:
    env = broker_env(db, BROKER_WORKERS="2", BROKER_HEALTH_INTERVAL="0.2")
    b = BrokerProcess(env, tmp_path / "b.log")
    try:
        first, second = workers_of(b)
        os.kill(second, signal.SIGKILL)
        deadline = time.monotonic() + 10
        saw_unready = False
        while not saw_unready and time.monotonic() < deadline:
            saw_unready = serving(b.target) is False
            await asyncio.sleep(0.02)
        # The worker left answers for both: the pod is not ready while one is gone...
        assert saw_unready
        # ...and ready again once the supervisor restarted it (every probe, whichever worker it reaches).
        deadline = time.monotonic() + 20
        streak = 0
        while streak < 10 and time.monotonic() < deadline:
            streak = streak + 1 if serving(b.target) else 0
            await asyncio.sleep(0.05)
        assert streak == 10
        now = workers_of(b)
        assert first in now
        assert second not in now
        assert len(now) == 2
    finally:
        assert b.stop() == 0


async def test_one_refresh_across_workers(db: Database, idp: OidcTestProvider, tmp_path: Path) -> None:
    """An expired token asked for over 20 connections spread over 2 workers: one grant at the IdP, one new token."""
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=1))
    b = BrokerProcess(broker_env(db, idp, BROKER_WORKERS="2"), tmp_path / "b.log")
    before = idp.stats()
    try:
        channels = [
            grpc.aio.insecure_channel(b.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(20)
        ]
        request = pb.GetOIDCAccessTokenRequest(user_id=str(uid))
        answers = await asyncio.gather(
            *(pb_grpc.TokenBrokerStub(c).GetOIDCAccessToken(request, timeout=20) for c in channels for _ in range(5))
        )
        for c in channels:
            await c.close()
    finally:
        assert b.stop() == 0
    after = idp.stats()
    assert (after["refresh_success"] - before["refresh_success"], after["invalid_grant"] - before["invalid_grant"]) == (
        1,
        0,
    )
    assert {a.status for a in answers} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}
    tokens = {a.access_token for a in answers}
    assert len(tokens) == 1
    assert issued.access_token not in tokens
    assert audit_workers(b.log_path) == {0, 1}


async def test_a_worker_that_refuses_its_configuration_stops_the_supervisor(db: Database, tmp_path: Path) -> None:
    """A port held by another program: every worker exits 2 (configuration error); no restart loop."""
    import socket
    import subprocess
    import sys

    from tests.support.broker import ROOT

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        env = {**os.environ, **broker_env(db, BROKER_WORKERS="2")}
        env["BROKER_HEALTH_LISTEN"] = f"127.0.0.1:{taken.getsockname()[1]}"
        r = subprocess.run(
            [sys.executable, "-m", "broker", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    finally:
        taken.close()
    assert r.returncode == 2
    assert "BROKER_HEALTH_LISTEN" in r.stderr + r.stdout


async def test_workers_stop_when_the_supervisor_is_killed(db: Database, tmp_path: Path) -> None:
    b = BrokerProcess(broker_env(db, BROKER_WORKERS="2"), tmp_path / "b.log")
    workers = workers_of(b)
    os.kill(b.proc.pid, signal.SIGKILL)  # the supervisor alone (an OOM kill, say)
    b.proc.wait()
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(alive(pid) for pid in workers)  # no orphan keeps serving the port
    assert "the supervisor is gone" in b.log_path.read_text()
    b.stop()
