"""BROKER_WORKERS > 1: one supervisor, several workers on one port. Calls over separate connections reach every
worker; one scrape sees them all; SIGTERM stops them all at once; the pod is ready while one worker serves; a dead
worker is restarted, also while the database is unreachable to it; only a configuration error stops them all, and
the supervisor says why; refresh safety holds across workers as across replicas."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database
from tests.support.proxy import proxied


def workers_of(b: BrokerProcess) -> list[int]:
    children = Path(f"/proc/{b.proc.pid}/task/{b.proc.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def gone(pid: int) -> bool:
    """Reaped by its supervisor: every thread has exited, so its sockets are closed. (A killed process's main thread
    can show as a zombie while its other threads still hold the listening socket.)"""
    return not Path(f"/proc/{pid}").exists()


def audit_workers(log: Path) -> set[int]:
    found = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("audit"):
                found.add(entry["worker"])
    return found


def entries(log: Path, msg: str) -> list[dict[str, Any]]:
    """The log lines (JSON) whose message starts with `msg`."""
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if str(entry.get("msg", "")).startswith(msg):
                found.append(entry)
    return found


def failed_starts(log: Path) -> list[dict[str, Any]]:
    """The supervisor's lines for a worker that exited 1 (could not start) and is restarted."""
    return [e for e in entries(log, "worker exited; restarting it") if e.get("exit_code") == 1]


def supervisor_refusals(stdout: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [
        e
        for e in lines
        if e["logger"] == "broker.supervisor"
        and e["level"] == "error"
        and e["msg"].startswith("worker refused its configuration")
    ]


def audited_by(log: Path, worker: int) -> int:
    return sum(1 for e in entries(log, "") if e.get("audit") and e.get("worker") == worker)


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def kill_orphans(log: Path) -> None:
    """After a failed test: SIGKILL the workers that outlived their supervisor (found by the log they write to)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "fd" / "1").resolve() == log.resolve() and alive(int(proc.name)):
                    os.kill(int(proc.name), signal.SIGKILL)


def new_connection(target: str) -> grpc.Channel:
    """A channel with its own connection (not shared with other channels of this process)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def serving(target: str) -> bool | None:
    """The token service's readiness as the worker this new connection reached answers it; None when the call
    failed (a connection queued on a worker that was just killed is reset)."""
    with new_connection(target) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="broker.v1.TokenBroker"), timeout=5
            )
        except grpc.RpcError:
            return None
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


async def serving_aio(target: str) -> bool | None:
    """As `serving`, without blocking the event loop."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="broker.v1.TokenBroker"), timeout=5
            )
        except grpc.RpcError:
            return None
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


async def status_aio(target: str, uid: uuid.UUID) -> int:
    """One call on a connection of its own; its TokenStatus (-1 when the call failed)."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            r = await pb_grpc.TokenBrokerStub(ch).GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=5
            )
        except grpc.RpcError:
            return -1
    return int(r.status)


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


def started_at(pid: int) -> float:
    """A process's start time as `process_start_time_seconds` computes it (boot time + start ticks)."""
    boot = next(
        float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    ticks = float(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def by_worker(text: str, name: str, **labels: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.labels["worker"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    }


async def test_every_process_has_its_process_metrics_labelled_by_worker(db: Database, tmp_path: Path) -> None:
    """The supervisor's scrape has process_*, python_gc_* and python_info for itself and each worker."""
    import httpx2

    b = BrokerProcess(broker_env(db, BROKER_WORKERS="2"), tmp_path / "b.log", metrics=True)
    try:
        url = f"http://127.0.0.1:{b.metrics_port}/metrics"
        every = {"supervisor", "0", "1"}
        gc = "python_gc_objects_collected_total"
        await until(lambda: set(by_worker(httpx2.get(url, timeout=5).text, gc, generation="0")) == every)
        text = httpx2.get(url, timeout=5).text
        for name in (
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_start_time_seconds",
            "python_gc_collections_total",
            "python_info",
        ):
            assert set(by_worker(text, name)) == every, name
        for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
            assert all(v > 0 for v in by_worker(text, name).values()), name
        # Each series is its own process's: the start times are the supervisor's and the two workers'.
        starts = by_worker(text, "process_start_time_seconds")
        assert starts["supervisor"] == pytest.approx(started_at(b.proc.pid))
        assert sorted([starts["0"], starts["1"]]) == pytest.approx(sorted(started_at(p) for p in workers_of(b)))
    finally:
        assert b.stop() == 0


def test_the_charts_process_panels_and_alerts_sum_over_the_workers() -> None:
    """With a series per process, every dashboard panel and alert on process metrics aggregates by pod."""
    import re

    import yaml

    from tests.support.broker import ROOT

    files = ROOT / "helm" / "token-broker" / "files"
    panels = json.loads((files / "dashboard.json").read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    rules = yaml.safe_load((files / "alerts.yaml").read_text())["groups"]
    exprs += [rule["expr"] for group in rules for rule in group["rules"]]
    on_process = [e for e in exprs if re.search(r"\b(process|python)_", e)]
    assert on_process  # the memory and CPU panels
    for expr in on_process:
        assert re.search(r"\b(sum|max|min|avg) by \([^)]*\bpod\b", expr), expr


async def test_sigterm_stops_every_worker_at_once(db: Database, tmp_path: Path) -> None:
    b = BrokerProcess(broker_env(db, BROKER_WORKERS="2", BROKER_SHUTDOWN_GRACE="5"), tmp_path / "b.log")
    workers = workers_of(b)
    started = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 5  # nothing in flight: no need to wait out the grace
    assert not any(alive(pid) for pid in workers)
    b.stop()


async def test_the_pod_stays_ready_while_a_killed_worker_restarts(db: Database, tmp_path: Path) -> None:
    """Readiness is the pod's: SERVING while at least one worker serves, whichever worker a probe reaches."""
    # A database check may take 2 s on a loaded machine before it counts as failed.
    env = broker_env(db, BROKER_WORKERS="2", BROKER_HEALTH_INTERVAL="2")
    b = BrokerProcess(env, tmp_path / "b.log")
    try:
        first, second = workers_of(b)
        os.kill(second, signal.SIGKILL)  # an OOM kill
        await until(lambda: gone(second))  # its socket is closed: no new connection can queue on it
        answers = []
        deadline = time.monotonic() + 20
        while len(workers_of(b)) < 2 or len(entries(b.log_path, "token-broker serving")) < 3:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            answers.append(serving(b.target))
            await asyncio.sleep(0.02)
        assert answers  # probed while the killed worker was gone or restarting...
        assert set(answers) == {True}  # ...and the other worker answered SERVING every time
        now = workers_of(b)
        assert first in now
        assert second not in now
        await until(lambda: all(serving(b.target) for _ in range(10)))  # and every probe, on either worker
    finally:
        assert b.stop() == 0


async def test_a_worker_restarting_while_the_database_is_unreachable_leaves_the_pod_serving(
    db: Database, tmp_path: Path
) -> None:
    """A worker killed during a database outage restarts with backoff (exit 1, not 2); the other keeps answering
    every call and the pod stays ready; the restarted worker takes calls only once its pool is open."""
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    async with proxied(db) as (proxy, url):
        # Every connection of the running worker's pool is opened at start-up: the outage reaches only new ones.
        env = broker_env(db, BROKER_WORKERS="2", BROKER_DATABASE_URL=url, BROKER_DB_POOL_MIN="6")
        env["BROKER_DB_POOL_MAX"] = "6"
        # A database check may take 2 s on a loaded machine before it counts as failed (and its connection, which
        # the outage would not let the pool replace, is dropped).
        env["BROKER_HEALTH_INTERVAL"] = "2"
        # The broker's calls pass through the proxy, which runs on this event loop: nothing here may block it.
        b = await asyncio.to_thread(BrokerProcess, env, tmp_path / "b.log")
        try:
            _, second = workers_of(b)
            proxy.refuse_new()
            os.kill(second, signal.SIGKILL)
            await until(lambda: gone(second))
            answers: list[tuple[bool | None, int]] = []
            deadline = time.monotonic() + 40
            while len(failed_starts(b.log_path)) < 2:  # the worker restarts, fails to connect, and again
                assert time.monotonic() < deadline, b.log_path.read_text()[-3000:]
                answers.append((await serving_aio(b.target), await status_aio(b.target, uid)))
            assert b.proc.poll() is None  # the pod stays up
            assert answers
            # Every probe and every call, on the survivor.
            assert set(answers) == {(True, pb.TOKEN_STATUS_VALID)}, (answers, b.log_path.read_text()[-4000:])
            assert len(workers_of(b)) in (1, 2)  # the survivor, and the restarting one when it is starting
            restarted = failed_starts(b.log_path)[0]["worker"]
            assert "database" in b.log_path.read_text()  # the failing worker said why

            proxy.heal()
            deadline = time.monotonic() + 60
            while not [e for e in entries(b.log_path, "token-broker serving") if e.get("worker") == restarted][1:]:
                assert time.monotonic() < deadline, "the restarted worker did not join"
                await asyncio.sleep(0.1)
            before = audited_by(b.log_path, restarted)
            while audited_by(b.log_path, restarted) == before:  # it takes calls again
                assert time.monotonic() < deadline, "the restarted worker took no call"
                assert await status_aio(b.target, uid) == pb.TOKEN_STATUS_VALID
        finally:
            assert await asyncio.to_thread(b.stop) == 0
    assert not entries(b.log_path, "worker refused its configuration")


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
    refused = supervisor_refusals(r.stdout)
    assert refused
    assert "BROKER_HEALTH_LISTEN" in refused[0]["msg"]  # the supervisor's own line carries the worker's reason


async def test_a_worker_refusing_the_encryption_key_names_the_setting(product_db: Database, tmp_path: Path) -> None:
    """The primary key is not in dbcrypt_keys: every worker exits 2, the supervisor stops with 2, and its own line
    says what the worker said: which setting to fix."""
    import subprocess
    import sys

    from tests.support.broker import ROOT

    key = base64.b64encode(os.urandom(32)).decode()
    env = {**os.environ, **broker_env(product_db, BROKER_WORKERS="2", BROKER_ENCRYPTION_KEYS=key)}
    r = subprocess.run(
        [sys.executable, "-m", "broker", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    refused = supervisor_refusals(r.stdout)
    assert refused
    assert "BROKER_ENCRYPTION_KEYS" in refused[0]["msg"]
    assert "not in dbcrypt_keys" in refused[0]["msg"]
    assert key not in r.stdout + r.stderr


async def test_serve_with_the_database_unreachable_exits_1_not_2(tmp_path: Path) -> None:
    """Exit 2 is kept for configuration errors: a database that cannot be reached at start-up may come back."""
    import subprocess
    import sys

    from broker.postgres.embedded import free_port
    from tests.support.broker import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(broker_env(None, BROKER_DATABASE_URL=f"postgresql://u:pw12345@127.0.0.1:{free_port()}/d"))
    r = subprocess.run(
        [sys.executable, "-m", "broker", "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1, r.stderr
    assert "token-broker: cannot start: database error while connecting" in r.stderr
    assert "Traceback" not in r.stderr
    assert "pw12345" not in r.stdout + r.stderr


async def test_workers_stop_when_the_supervisor_is_killed(db: Database, tmp_path: Path) -> None:
    b = BrokerProcess(broker_env(db, BROKER_WORKERS="2"), tmp_path / "b.log")
    workers = workers_of(b)
    try:
        os.kill(b.proc.pid, signal.SIGKILL)  # the supervisor alone (an OOM kill, say)
        b.proc.wait()
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(alive(pid) for pid in workers)  # no orphan keeps serving the port
        assert "the supervisor is gone" in b.log_path.read_text()
    finally:
        b.stop()
        kill_orphans(b.log_path)


async def test_a_worker_starting_when_its_supervisor_is_killed_stops_too(db: Database, tmp_path: Path) -> None:
    """The supervisor is killed while a restarted worker is still opening its pool: once started, that worker sees
    its supervisor gone as the others do (it was re-parented before it could look at its parent)."""
    async with proxied(db) as (proxy, url):
        env = broker_env(db, BROKER_WORKERS="2", BROKER_DATABASE_URL=url, BROKER_REQUEST_TIMEOUT="30")
        b = await asyncio.to_thread(BrokerProcess, env, tmp_path / "b.log")
        try:
            first, second = workers_of(b)
            proxy.silence()  # a new worker's connections hang: it stays in start-up
            os.kill(second, signal.SIGKILL)
            await until(lambda: len(set(workers_of(b)) - {first, second}) == 1)
            (third,) = set(workers_of(b)) - {first, second}
            os.kill(b.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(b.proc.wait)
            proxy.heal()
            await until(lambda: not alive(first) and not alive(third), timeout=40)
        finally:
            await asyncio.to_thread(b.stop)
            kill_orphans(b.log_path)
    gone = entries(b.log_path, "the supervisor is gone")
    assert {e["worker"] for e in gone} == {0, 1}  # the survivor and the one that was starting
