"""The log as a real broker process writes it: a failing stdout changes no answer, and secrets with quotes,
backslashes or `@` are redacted in every form they reach a line in."""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env
from tests.support.pg import Database
from tests.support.token_endpoint import Scripted, TokenEndpoint


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_closed_stdout_changes_no_answer(db: Database, tmp_path: Path, workers: int) -> None:
    """stdout is a pipe nobody reads (closed read end): every call at INFO still gets its token, and the write error
    is reported on stderr once per process (the supervisor and each worker), not per call."""
    uid = uuid.uuid4()
    await db.insert_link(uid, "pipe-access-token", "pipe-refresh-token", datetime.now(UTC) + timedelta(hours=1))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        broker = BrokerProcess(
            broker_env(db, BROKER_LOG_LEVEL="INFO", BROKER_WORKERS=str(workers)),
            tmp_path / "stderr.log",
            stdout=write_end,
        )
    finally:
        os.close(write_end)
    try:
        async with grpc.aio.insecure_channel(broker.target) as channel:
            stub = pb_grpc.TokenBrokerStub(channel)
            for _ in range(40):
                r = await stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=5)
                assert r.status == pb.TOKEN_STATUS_VALID
                assert r.access_token == "pipe-access-token"
    finally:
        assert broker.stop() == 0
    stderr = broker.log_path.read_text()
    processes = workers + 1 if workers > 1 else 1
    assert 1 <= stderr.count("writing the log failed: BrokenPipeError") <= processes, stderr
    assert "Traceback" not in stderr


def _wait_for(path: Path, needle: str, count: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text()
        if text.count(needle) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


async def test_secrets_with_quotes_backslashes_and_at_signs_are_redacted(db: Database, tmp_path: Path) -> None:
    """An IdP whose error names the client secret or the database password (as given, not percent-encoded): the
    WARNING the broker logs carries neither, in no form (raw, JSON-escaped, percent-encoded)."""
    client_secret = 'cl"ient\\secret'
    db_password = 'p@ss"w\\rd'
    endpoint = TokenEndpoint()
    try:
        access, refresh = endpoint.issue()
        users = [uuid.uuid4(), uuid.uuid4()]
        for uid in users:
            await db.insert_link(uid, access, refresh, datetime.now(UTC) - timedelta(minutes=5))
        endpoint.script = [Scripted(400, {"error": client_secret}), Scripted(400, {"error": db_password})]
        user, host = db.service_url.split("//", 1)[1].split("@", 1)
        dsn = f"postgresql://{user}:{quote(db_password, safe='')}@{host}"
        assert dsn.count("@") == 1
        env = broker_env(
            None,
            BROKER_DATABASE_URL=dsn,
            BROKER_OIDC_ISSUER=endpoint.issuer,
            BROKER_OIDC_CLIENT_ID="broker",
            BROKER_OIDC_CLIENT_SECRET=client_secret,
        )
        broker = BrokerProcess(env, tmp_path / "broker.log")
        try:
            async with grpc.aio.insecure_channel(broker.target) as channel:
                stub = pb_grpc.TokenBrokerStub(channel)
                for uid in users:
                    r = await stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=10)
                    assert r.access_token == ""
            text = _wait_for(broker.log_path, "[REDACTED]", 2)
        finally:
            broker.stop()
    finally:
        endpoint.close()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    refusals = [line["msg"] for line in lines if "answered HTTP 400" in line["msg"]]
    assert len(refusals) == 2, refusals
    assert all("[REDACTED]" in msg for msg in refusals), refusals
    for secret in (client_secret, db_password):
        for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
            assert form not in text
