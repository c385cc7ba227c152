"""The server as operators and callers see it: health, reflection, shutdown, CLI, and error mapping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.core.tokens import TokenService
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import ROOT, BrokerProcess, broker_env, running_broker
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status
    return status


async def test_health_liveness_and_readiness_follow_the_database(db: Database) -> None:
    async with running_broker(broker_env(db)) as b:
        for _ in range(20):
            if await _health(b.channel, "broker.v1.TokenBroker") == SERVING:
                break
            await asyncio.sleep(0.1)
        assert await _health(b.channel, "") == SERVING
        assert await _health(b.channel, "broker.v1.TokenBroker") == SERVING
        await db.set_reachable(False)
        for _ in range(40):
            if await _health(b.channel, "broker.v1.TokenBroker") == NOT_SERVING:
                break
            await asyncio.sleep(0.1)
        assert await _health(b.channel, "broker.v1.TokenBroker") == NOT_SERVING
        assert await _health(b.channel, "") == SERVING  # liveness is not tied to the database
        await db.set_reachable(True)
        for _ in range(40):
            if await _health(b.channel, "broker.v1.TokenBroker") == SERVING:
                break
            await asyncio.sleep(0.1)
        assert await _health(b.channel, "broker.v1.TokenBroker") == SERVING


async def test_reflection_lists_the_service(db: Database) -> None:
    async with running_broker(broker_env(db)) as b:
        stub = reflection_pb2_grpc.ServerReflectionStub(b.channel)

        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for resp in stub.ServerReflectionInfo(requests(), timeout=5):
            names = [s.name for s in resp.list_services_response.service]
    assert "broker.v1.TokenBroker" in names
    assert "grpc.health.v1.Health" in names


async def test_unexpected_errors_are_internal_without_details(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(self: TokenService, user_id: uuid.UUID, budget: float) -> None:
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(TokenService, "get_token", boom)
    async with running_broker(broker_env(db)) as b:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await b.get(uuid.uuid4())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert "hunter2" not in str(err.value)


async def test_sigterm_drains_in_flight_calls_then_exits_cleanly(
    db: Database, idp: OidcTestProvider, tmp_path: Path
) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=1))
    proc = BrokerProcess(broker_env(db, idp, BROKER_DRAIN_DELAY="0.5", BROKER_SHUTDOWN_GRACE="5"), tmp_path / "b.log")
    async with grpc.aio.insecure_channel(proc.target) as channel:
        stub = pb_grpc.TokenBrokerStub(channel)
        # Discovery first, then make the refresh slow so it is in flight at SIGTERM.
        await stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uuid.uuid4())), timeout=5)
        idp.set_fault("ok", delay_ms=1200)
        call = asyncio.ensure_future(
            stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=10)
        )
        await asyncio.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        assert await _health(channel, "broker.v1.TokenBroker") == NOT_SERVING
        assert await _health(channel, "") == NOT_SERVING
        r = await call
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    assert proc.proc.wait(timeout=15) == 0
    proc.stop()
    row = await db.link(uid)
    assert row is not None
    assert row["oauth_access_token"] == r.access_token


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], env=full, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_bad_configuration_stops_with_one_message_naming_every_variable() -> None:
    r = _cli(
        "serve",
        env={
            "BROKER_DATABASE_URL": "postgresql://x:topsecret@127.0.0.1/db",
            "BROKER_REFRESH_LEEWAY": "soon",
            "BROKER_OIDC_TIMEOUT": "0",
        },
    )
    assert r.returncode == 2
    assert "BROKER_REFRESH_LEEWAY" in r.stderr
    assert "BROKER_OIDC_TIMEOUT" in r.stderr
    assert "topsecret" not in r.stderr + r.stdout


def test_serve_without_a_database_url_says_so() -> None:
    r = _cli("serve")
    assert r.returncode == 2
    assert "BROKER_DATABASE_URL" in r.stderr


def test_non_loopback_bind_without_authentication_refuses_to_start(db: Database) -> None:
    r = _cli(
        "serve", env={"BROKER_DATABASE_URL": db.service_url, "BROKER_LISTEN": "0.0.0.0:0", "BROKER_METRICS_LISTEN": ""}
    )
    assert r.returncode == 2
    assert "refusing the non-loopback address" in r.stderr
    assert "BROKER_ALLOW_INSECURE" in r.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["migrate"], ["get"], ["health"], ["dev"]])
def test_help(command: list[str]) -> None:
    r = _cli(*command, "--help")
    assert r.returncode == 0
    assert "usage: token-broker" in r.stdout


async def test_cli_get_prints_status_and_token_only_on_request(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "cli-visible-token", "r", datetime.now(UTC) + timedelta(hours=1))
    async with running_broker(broker_env(db)) as b:
        hidden = await asyncio.to_thread(_cli, "get", str(uid), "--target", b.target)
        shown = await asyncio.to_thread(_cli, "get", str(uid), "--target", b.target, "--show-token")
        bad = await asyncio.to_thread(_cli, "get", "nope", "--target", b.target)
    assert hidden.returncode == 0
    assert "status: VALID" in hidden.stdout
    assert "expires_at: 20" in hidden.stdout
    assert "cli-visible-token" not in hidden.stdout
    assert "access_token: cli-visible-token" in shown.stdout
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr


def test_cli_migrate_is_idempotent(db: Database) -> None:
    for _ in range(2):
        r = _cli("migrate", env={"BROKER_MIGRATE_DATABASE_URL": db.admin_url})
        assert r.returncode == 0, r.stderr
    assert '"applied":[]' in r.stdout


def test_python_dash_m_and_console_script_are_the_same_cli() -> None:
    script = Path(sys.executable).with_name("token-broker")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert r.stdout.startswith("token-broker ")
    assert _cli("--version").stdout == r.stdout


async def test_embedded_postgres_smoke(tmp_path: Path) -> None:
    """The no-server path: an embedded PostgreSQL, migrated, serving a token through gRPC."""
    from broker.postgres.embedded import EmbeddedPostgres
    from broker.postgres.migrate import migrate
    from tests.support.pg import Database as Db

    pg = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        started = time.monotonic()
        await migrate(pg.url(), "token_broker")
        db = Db("postgres", pg.url(), pg.url(user="token_broker"))
        uid = uuid.uuid4()
        await db.insert_link(uid, "embedded-token", "r", None)
        async with running_broker(broker_env(db)) as b:
            r = await b.get(uid)
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "embedded-token")
        assert time.monotonic() - started < 30
    finally:
        pg.stop()
