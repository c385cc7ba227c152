"""Callers: the Python clients, a worked chat-worker example, a Node.js client and grpcurl, all against the real
broker; plus the client's retry policy against a server that fails on purpose."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx2
import pytest

from broker.client import SyncTokenBrokerClient, TokenBrokerClient
from broker.model import TokenStatus
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from examples.chat_worker import call_mcp
from tests.support.broker import ROOT, broker_env, running_broker
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))


async def _seed(db: Database) -> tuple[uuid.UUID, uuid.UUID, datetime]:
    oidc, password = uuid.uuid4(), uuid.uuid4()
    expiry = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    await db.insert_link(oidc, "worker-token-abc", "r", expiry)
    await db.insert_link(password, "", "", None, login_type="password")
    return oidc, password, expiry


async def test_async_client(db: Database) -> None:
    oidc, password, expiry = await _seed(db)
    async with running_broker(broker_env(db)) as b, TokenBrokerClient(b.target) as client:
        token = await client.get_oidc_access_token(str(oidc))
        assert (token.access_token, token.status, token.expires_at) == ("worker-token-abc", TokenStatus.VALID, expiry)
        assert "worker-token-abc" not in repr(token)
        assert await client.bearer_headers(str(oidc)) == {"Authorization": "Bearer worker-token-abc"}
        none = await client.get_oidc_access_token(str(password))
        assert (none.access_token, none.status, none.expires_at) == ("", TokenStatus.NO_LINK, None)
        assert await client.bearer_headers(str(password)) == {}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.get_oidc_access_token("bogus")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sync_client(db: Database) -> None:
    oidc, password, _ = await _seed(db)
    async with running_broker(broker_env(db)) as b:

        def work() -> tuple[dict[str, str], dict[str, str]]:
            with SyncTokenBrokerClient(b.target) as client:
                return client.bearer_headers(str(oidc)), client.bearer_headers(str(password))

        with_token, without = await asyncio.to_thread(work)
    assert with_token == {"Authorization": "Bearer worker-token-abc"}
    assert without == {}


class _Upstream(BaseHTTPRequestHandler):
    """An "MCP server": 200 only with the right bearer token, else 401."""

    expected = ""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        ok = self.headers.get("authorization") == f"Bearer {self.expected}"
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    _Upstream.expected = "worker-token-abc"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mcp"
    server.shutdown()
    server.server_close()


async def test_chat_worker_example(db: Database, upstream: str) -> None:
    oidc, password, _ = await _seed(db)
    async with (
        running_broker(broker_env(db)) as b,
        TokenBrokerClient(b.target) as client,
        httpx2.AsyncClient(timeout=5) as http,
    ):
        assert await call_mcp(client, http, upstream, str(oidc)) == 200
        assert await call_mcp(client, http, upstream, str(password)) == 401


class _Flaky(pb_grpc.TokenBrokerServicer):
    """Answers UNAVAILABLE twice, then OK: an edge case the real broker does not produce on demand."""

    def __init__(self) -> None:
        self.calls = 0

    async def GetOIDCAccessToken(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls <= 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.GetOIDCAccessTokenResponse(access_token="t", status=pb.TOKEN_STATUS_VALID)


async def test_client_retries_unavailable_with_backoff() -> None:
    server = grpc.aio.server()
    flaky = _Flaky()
    pb_grpc.add_TokenBrokerServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with TokenBrokerClient(f"127.0.0.1:{port}") as client:
            token = await client.get_oidc_access_token(str(uuid.uuid4()))
    finally:
        await server.stop(0)
    assert token.access_token == "t"
    assert flaky.calls == 3


async def test_client_sets_a_deadline_by_default() -> None:
    server = grpc.aio.server()

    class Slow(pb_grpc.TokenBrokerServicer):
        async def GetOIDCAccessToken(self, request, context):  # type: ignore[no-untyped-def]
            await asyncio.sleep(5)
            return pb.GetOIDCAccessTokenResponse()

    pb_grpc.add_TokenBrokerServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with TokenBrokerClient(f"127.0.0.1:{port}", timeout=0.3) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.get_oidc_access_token(str(uuid.uuid4()))
    finally:
        await server.stop(0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_node_client_loading_protos_directly(db: Database) -> None:
    oidc, password, expiry = await _seed(db)
    script = ROOT / "tests" / "idp" / "grpc_client.mjs"
    async with running_broker(broker_env(db)) as b:

        def node(user: str, *rejected: str) -> dict[str, object]:
            out = subprocess.run(
                ["node", str(script), b.target, user, *rejected], capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, out.stderr
            return dict(json.loads(out.stdout))

        ok, none, bad = await asyncio.gather(*(asyncio.to_thread(node, u) for u in (str(oidc), str(password), "x")))
        # No refresh token and no IdP here: a report of the stored token is REAUTH_REQUIRED, never that token.
        reported = await asyncio.to_thread(node, str(oidc), "worker-token-abc")
    assert ok == {
        "code": "OK",
        "status": "TOKEN_STATUS_VALID",
        "access_token": "worker-token-abc",
        "expires_at": str(int(expiry.timestamp())),
    }
    assert (none["status"], none["access_token"]) == ("TOKEN_STATUS_NO_LINK", "")
    assert (reported["status"], reported["access_token"]) == ("TOKEN_STATUS_REAUTH_REQUIRED", "")
    assert bad["code"] == "INVALID_ARGUMENT"


@pytest.mark.skipif(shutil.which(GRPCURL) is None, reason="grpcurl is installed by make install")
async def test_grpcurl_lists_describes_and_calls_through_reflection(db: Database) -> None:
    oidc, _, _ = await _seed(db)
    async with running_broker(broker_env(db)) as b:

        def grpcurl(*args: str) -> str:
            out = subprocess.run(
                [GRPCURL, "-plaintext", "-max-time", "10", *args], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        listed = await asyncio.to_thread(grpcurl, b.target, "list")
        described = await asyncio.to_thread(grpcurl, b.target, "describe", "broker.v1.TokenBroker")
        called = await asyncio.to_thread(
            grpcurl, "-d", json.dumps({"user_id": str(oidc)}), b.target, "broker.v1.TokenBroker/GetOIDCAccessToken"
        )
    assert "broker.v1.TokenBroker" in listed.split()
    assert "rpc GetOIDCAccessToken" in described
    body = json.loads(called)
    assert body["access_token"] == "worker-token-abc"  # grpcurl 1.8 keeps proto field names
    assert body["status"] == "TOKEN_STATUS_VALID"


async def test_chat_worker_reports_a_refused_token_and_retries_once(db: Database, idp: OidcTestProvider) -> None:
    """The upstream refuses the first token (revoked on its side); the worker reports it and retries with the
    refreshed one, which the upstream checks with the IdP."""
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(hours=1))
    seen: list[str] = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            token = (self.headers.get("authorization") or "").removeprefix("Bearer ")
            seen.append(token)
            ok = bool(token) and token != issued.access_token and idp.active(token)
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = idp.stats()
    try:
        async with (
            running_broker(broker_env(db, idp)) as b,
            TokenBrokerClient(b.target) as client,
            httpx2.AsyncClient(timeout=5) as http,
        ):
            status = await call_mcp(client, http, f"http://127.0.0.1:{server.server_address[1]}/mcp", str(uid))
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert len(seen) == 2
    assert seen[0] == issued.access_token
    assert seen[1] not in ("", issued.access_token)
    assert idp.stats()["refresh_success"] - before["refresh_success"] == 1
