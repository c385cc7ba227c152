"""Metrics scraped over HTTP, logs as JSON lines, and no secret anywhere an operator looks."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx2
import yaml
from prometheus_client import CollectorRegistry

from broker.telemetry.metrics import Metrics
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import ROOT, BrokerProcess, broker_env, running_broker
from tests.support.idp import CLIENT_SECRET, OidcTestProvider
from tests.support.pg import Database

HELM_FILES = ROOT / "helm" / "token-broker" / "files"


async def test_counters_move_by_exactly_what_the_test_did(db: Database, idp: OidcTestProvider) -> None:
    fresh, stale, missing = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.insert_link(fresh, "a-fresh", "r-fresh", datetime.now(UTC) + timedelta(hours=1))
    issued = await idp.login(f"user-{stale}")
    await db.insert_link(stale, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=1))
    async with running_broker(broker_env(db, idp)) as b:
        for _ in range(3):
            assert (await b.get(fresh)).status == pb.TOKEN_STATUS_VALID
        assert (await b.get(stale)).status == pb.TOKEN_STATUS_REFRESHED
        assert (await b.get(missing)).status == pb.TOKEN_STATUS_NO_LINK
        with contextlib.suppress(grpc.aio.AioRpcError):
            await b.get("not-a-uuid")
        text = b.metrics_text()
        s = b.sample
        assert s("token_broker_token_requests_total", status="valid") == 3
        assert s("token_broker_token_requests_total", status="refreshed") == 1
        assert s("token_broker_token_requests_total", status="no_link") == 1
        assert s("token_broker_token_requests_total", status="expired") == 0
        assert s("token_broker_refreshes_total", result="success") == 1
        assert s("token_broker_refresh_duration_seconds_count") == 1
        assert s("token_broker_refresh_lock_wait_seconds_count") == 1
        assert s("token_broker_refresh_inflight") == 0
        assert s("token_broker_token_remaining_seconds_count") == 4  # 3 valid + 1 refreshed
        method = {"grpc_service": "broker.v1.TokenBroker", "grpc_method": "GetOIDCAccessToken", "grpc_type": "unary"}
        assert s("grpc_server_started_total", **method) == 6
        assert s("grpc_server_handled_total", grpc_code="OK", **method) == 5
        assert s("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **method) == 1
        assert s("grpc_server_handling_seconds_count", **method) == 6
        assert s("token_broker_build_info", version="0.1.0") == 1
        assert s("token_broker_idp_circuit_state") == 0
        assert s("token_broker_db_pool_connections") >= 1
        assert "process_resident_memory_bytes" in text
        assert "python_info" in text
    for uid in (fresh, stale, missing):
        assert str(uid) not in text


async def test_no_secret_in_logs_or_metrics(db: Database, idp: OidcTestProvider, tmp_path: Path) -> None:
    """A full scenario with known token values, client secret and DSN password, logged at DEBUG."""
    password = "dsn-pass-8c1e77"
    service_url = db.service_url.replace("token_broker@", f"token_broker:{password}@")
    fresh, stale, dead = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    issued = await idp.login(f"user-{stale}")
    await db.insert_link(
        fresh, "known-access-token-1f3a", "known-refresh-token-9b2c", datetime.now(UTC) + timedelta(hours=1)
    )
    await db.insert_link(stale, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=1))
    await db.insert_link(
        dead, "dead-access-token-55aa", "dead-refresh-token-77bb", datetime.now(UTC) - timedelta(minutes=1)
    )
    env = broker_env(db, idp, BROKER_DATABASE_URL=service_url, BROKER_LOG_LEVEL="DEBUG")
    log_path = tmp_path / "broker.log"
    proc = BrokerProcess(env, log_path, metrics=True)
    served: list[str] = []
    try:
        async with grpc.aio.insecure_channel(proc.target) as channel:
            stub = pb_grpc.TokenBrokerStub(channel)
            for uid in (fresh, stale, dead, fresh, uuid.uuid4()):
                r = await stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=10)
                served.append(r.access_token)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.GetOIDCAccessToken(
                    pb.GetOIDCAccessTokenRequest(user_id="known-access-token-1f3a"), timeout=5
                )
        metrics = httpx2.get(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5).text
    finally:
        assert proc.stop() == 0
    row = await db.link(stale)
    assert row is not None
    secrets = {
        "known-access-token-1f3a",
        "known-refresh-token-9b2c",
        "dead-access-token-55aa",
        "dead-refresh-token-77bb",
        issued.access_token,
        issued.refresh_token,
        row["oauth_access_token"],
        row["oauth_refresh_token"],
        CLIENT_SECRET,
        password,
        *[s for s in served if s],
    }
    logs = log_path.read_text()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(line.get("audit") and line.get("status") == "refreshed" and line.get("refreshed") for line in lines)
    assert all({"ts", "level", "msg"} <= line.keys() for line in lines)
    for secret in secrets:
        assert secret not in logs, "a secret leaked into the logs"
        assert secret not in metrics, "a secret leaked into /metrics"


def _exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    names: set[str] = set()
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
        "summary": ["", "_sum", "_count"],
    }
    for family in registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
        names.update(s.name for s in family.samples)
    return names


def _referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:token_broker|grpc_server|process|python)_[a-z0-9_]+)\b", expr))


def test_alert_rules_are_valid_and_use_only_exported_metrics() -> None:
    exported = _exported_metric_names()
    rules = yaml.safe_load((HELM_FILES / "alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "TokenBrokerRefreshFailureRatioHigh",
        "TokenBrokerStoreUnavailable",
        "TokenBrokerIdpCircuitOpen",
        "TokenBrokerHighLatencyP99",
    }
    for a in alerts:
        assert a["annotations"]["summary"]
        assert a["labels"]["severity"] in {"warning", "critical"}
        used = _referenced(a["expr"])
        assert used, a["alert"]
        assert used <= exported, (a["alert"], used - exported)


def test_dashboard_is_valid_json_and_uses_only_exported_metrics() -> None:
    exported = _exported_metric_names()
    dash = json.loads((HELM_FILES / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        used = _referenced(expr)
        assert used, expr
        assert used <= exported, (expr, used - exported)


def test_metric_names_follow_prometheus_conventions() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    for family in registry.collect():
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name)
        if family.type == "histogram" and not family.name.startswith("grpc_"):
            assert family.name.endswith("_seconds"), family.name
        for s in family.samples:
            assert "user" not in " ".join(s.labels)
