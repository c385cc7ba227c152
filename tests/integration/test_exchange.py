"""Audience-bound tokens (#24): the login token exchanged at the real oidc-provider (an RFC 8693 grant registered in
the test IdP) for a JWT whose aud is the MCP server, checked by an MCP-server stand-in against the IdP's JWKS; cached
and deduplicated across callers and replicas in PostgreSQL; the resource policy; the failure table."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import httpx2
import pytest
import yaml
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.client import SyncTokenBrokerClient, TokenBrokerClient
from broker.model import TokenStatus
from broker.postgres.dbcrypt import key_digest
from broker.telemetry.tracing import OtelTracer
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from examples.chat_worker import call_mcp
from tests.support.broker import ROOT, BrokerProcess, broker_env, running_broker, warm_discovery
from tests.support.golang import client_dir, run_go
from tests.support.idp import OidcTestProvider
from tests.support.mcp import McpStandIn
from tests.support.pg import Database

CHAT = "chat-worker-caller-token-4b1d"  # the caller token of `token:chat`
OTHER = "other-service-caller-token-9e2a"  # the caller token of `token:other`, listed for no resource here


def files(tmp_path: Path, resources: list[dict[str, object]]) -> dict[str, str]:
    tokens = tmp_path / "callers.txt"
    tokens.write_text(
        "".join(f"{name}:{hashlib.sha256(t.encode()).hexdigest()}\n" for name, t in (("chat", CHAT), ("other", OTHER)))
    )
    policy = tmp_path / "resources.yaml"
    policy.write_text(yaml.safe_dump({"resources": resources}))
    return {"BROKER_CALLER_TOKENS_FILE": str(tokens), "BROKER_RESOURCES_FILE": str(policy)}


def entry(resource: str, *callers: str) -> dict[str, object]:
    return {"resource": resource, "callers": list(callers or ("token:chat",))}


def request(uid: uuid.UUID, resource: str = "", rejected: str = "") -> pb.GetOIDCAccessTokenRequest:
    digest = hashlib.sha256(rejected.encode()).hexdigest() if rejected else ""
    return pb.GetOIDCAccessTokenRequest(user_id=str(uid), resource=resource, rejected_token_sha256=digest)


async def ask(
    stub: pb_grpc.TokenBrokerStub, uid: uuid.UUID, resource: str = "", *, caller: str = CHAT, rejected: str = ""
) -> pb.GetOIDCAccessTokenResponse:
    response: pb.GetOIDCAccessTokenResponse = await stub.GetOIDCAccessToken(
        request(uid, resource, rejected), timeout=15, metadata=(("authorization", f"Bearer {caller}"),)
    )
    return response


async def logged_in(db: Database, idp: OidcTestProvider, *, users_table: bool = False) -> tuple[uuid.UUID, str]:
    uid = uuid.uuid4()
    if users_table:
        await db.execute("INSERT INTO users (id, email, username) VALUES ($1, $2, $3)", uid, f"{uid}@x.test", str(uid))
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(hours=1))
    return uid, issued.access_token


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


async def test_the_exchanged_token_is_issued_for_the_resource_and_served_from_the_cache(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    mine, other = mcp.resource(), mcp.resource()
    idp.allow_exchange(mine)
    idp.allow_exchange(other)
    uid, login = await logged_in(db, idp)
    before = idp.stats()
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(mine), entry(other)]))) as b:
        first = await ask(b.stub, uid, mine)
        second = await ask(b.stub, uid, mine)
        for_other = await ask(b.stub, uid, other)
        passthrough = await ask(b.stub, uid)
        assert b.sample("token_broker_exchanges_total", result="success") == 2
        assert b.sample("token_broker_exchange_cache_hits_total") == 1
    assert first.status == pb.TOKEN_STATUS_REFRESHED
    assert first.access_token not in ("", login)
    assert first.HasField("expires_at")
    assert (second.status, second.access_token) == (pb.TOKEN_STATUS_VALID, first.access_token)
    assert delta(before, idp.stats())["exchange_success"] == 2
    assert mcp.call(mine, first.access_token) == 200
    assert mcp.call(mine, login) == 401  # the login token is not for this server
    assert mcp.call(mine, for_other.access_token) == 401  # nor a token exchanged for another one
    assert mcp.call(other, for_other.access_token) == 200
    assert passthrough.access_token == login  # BROKER_PASSTHROUGH=allow (the default): today's behaviour


async def test_300_callers_on_two_brokers_cause_one_exchange(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, login = await logged_in(db, idp)
    env = broker_env(db, idp, **files(tmp_path, [entry(resource)]))
    replicas = [BrokerProcess(env, tmp_path / f"replica{i}.log") for i in range(2)]
    before = idp.stats()
    try:
        channels = [grpc.aio.insecure_channel(r.target) for r in replicas]
        stubs = [pb_grpc.TokenBrokerStub(c) for c in channels]
        answers = await asyncio.gather(*(ask(stub, uid, resource) for stub in stubs for _ in range(150)))
        later = [await ask(stub, uid, resource) for stub in stubs]
        for c in channels:
            await c.close()
    finally:
        codes = [r.stop() for r in replicas]
    d = delta(before, idp.stats())
    print(f"\n300 callers on 2 brokers, one (user, resource): {d['exchange_success']} exchange at the IdP")
    assert d["exchange_success"] == 1
    assert d["exchange_denied"] == d["exchange_invalid_subject"] == 0
    tokens = {a.access_token for a in answers}
    assert len(tokens) == 1
    assert "" not in tokens
    assert login not in tokens
    assert {a.status for a in answers} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}
    assert [(a.status, a.access_token) for a in later] == [(pb.TOKEN_STATUS_VALID, a) for a in tokens] * 2
    assert mcp.call(resource, tokens.pop()) == 200
    assert codes == [0, 0]


async def test_an_exchanged_token_near_its_expiry_is_exchanged_again(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource, ttl=4)  # the leeway is capped at half of it: served for about 2 s
    uid, _ = await logged_in(db, idp)
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        first = await ask(b.stub, uid, resource)
        assert first.status == pb.TOKEN_STATUS_REFRESHED
        deadline = time.monotonic() + 20
        answer = first
        while answer.access_token == first.access_token and time.monotonic() < deadline:
            assert answer.status in (pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID)
            await asyncio.sleep(0.1)
            answer = await ask(b.stub, uid, resource)
        assert answer.status == pb.TOKEN_STATUS_REFRESHED
        assert answer.access_token not in ("", first.access_token)
        assert b.sample("token_broker_exchanges_total", result="success") == 2
    assert mcp.call(resource, answer.access_token) == 200


async def test_a_new_login_is_never_served_the_previous_logins_exchanged_token(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(db, idp)
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        first = await ask(b.stub, uid, resource)
        again = await idp.login(f"user-{uid}")
        await db.execute(
            "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3 WHERE user_id = $1",
            uid,
            again.access_token,
            again.refresh_token,
        )
        after = await ask(b.stub, uid, resource)
    assert first.status == after.status == pb.TOKEN_STATUS_REFRESHED  # exchanged again, from the new login
    assert after.access_token not in ("", first.access_token, again.access_token)
    assert mcp.call(resource, after.access_token) == 200


async def test_a_disabled_account_or_a_removed_link_gets_no_token_for_a_resource(
    product_db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(product_db, idp, users_table=True)
    gone, _ = await logged_in(product_db, idp, users_table=True)
    async with running_broker(broker_env(product_db, idp, **files(tmp_path, [entry(resource)]))) as b:
        assert (await ask(b.stub, uid, resource)).status == pb.TOKEN_STATUS_REFRESHED
        assert (await ask(b.stub, gone, resource)).status == pb.TOKEN_STATUS_REFRESHED
        await product_db.execute("UPDATE users SET status = 'suspended' WHERE id = $1", uid)
        await product_db.execute("DELETE FROM user_links WHERE user_id = $1", gone)
        disabled = await ask(b.stub, uid, resource)
        unlinked = await ask(b.stub, gone, resource)
    assert (disabled.status, disabled.access_token) == (pb.TOKEN_STATUS_ACCOUNT_DISABLED, "")
    assert (unlinked.status, unlinked.access_token) == (pb.TOKEN_STATUS_NO_LINK, "")


async def test_a_refused_exchange_is_exchange_denied_and_remembered(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()  # in the broker's policy, but the IdP lets no client exchange for it
    uid, _ = await logged_in(db, idp)
    before = idp.stats()
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        answers = await asyncio.gather(*(ask(b.stub, uid, resource) for _ in range(50)))
        later = await ask(b.stub, uid, resource)
        assert b.sample("token_broker_exchanges_total", result="denied") == 1
    assert {(a.status, a.access_token) for a in [*answers, later]} == {(pb.TOKEN_STATUS_EXCHANGE_DENIED, "")}
    assert delta(before, idp.stats())["exchange_denied"] == 1  # a stampede on a denied resource costs one request


async def test_an_invalid_login_token_is_refreshed_once_and_the_exchange_retried(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, login = await logged_in(db, idp)
    revoked, revoked_login = await logged_in(db, idp)
    idp.forget(login)  # the IdP answers invalid_grant for it as the subject token; its refresh token still works
    idp.revoke(revoked_login)  # the whole grant: the refresh is refused too
    before = idp.stats()
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        answer = await ask(b.stub, uid, resource)
        must_log_in = await ask(b.stub, revoked, resource)
    assert (must_log_in.status, must_log_in.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    d = delta(before, idp.stats())
    assert answer.status == pb.TOKEN_STATUS_REFRESHED
    assert mcp.call(resource, answer.access_token) == 200
    assert (d["exchange_invalid_subject"], d["refresh_success"], d["exchange_success"]) == (2, 1, 1)
    row = await db.link(uid)
    assert row is not None
    assert row["oauth_access_token"] != login  # the refreshed login token was written back


async def test_idp_down_is_idp_unavailable_and_opens_the_circuit(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(db, idp)
    env = broker_env(db, idp, BROKER_CIRCUIT_FAILURES="2", BROKER_CIRCUIT_OPEN_SECONDS="60")
    async with running_broker({**env, **files(tmp_path, [entry(resource)])}) as b:
        await warm_discovery(b)
        idp.set_fault("down")
        answers = [await ask(b.stub, uid, resource) for _ in range(2)]
        sent = idp.stats()["token_requests"]
        more = [await ask(b.stub, uid, resource) for _ in range(5)]
        assert b.sample("token_broker_idp_circuit_state") == 1
        assert b.sample("token_broker_exchanges_total", result="idp_unavailable") == 2
        assert idp.stats()["token_requests"] == sent  # the open circuit answers without the IdP
    assert {(a.status, a.access_token) for a in [*answers, *more]} == {(pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")}


async def test_unknown_resource_and_unlisted_caller_get_the_same_permission_denied(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource, unknown = mcp.resource(), mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(db, idp)
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        errors = []
        for target, caller in ((unknown, CHAT), (resource, OTHER)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ask(b.stub, uid, target, caller=caller)
            errors.append((err.value.code(), err.value.details()))
        # the normalised form matches: upper-case host and an explicit default port are the same resource
        same = await ask(b.stub, uid, resource.replace("http://127.0.0.1", "HTTP://127.0.0.1"))
        bad = []
        for wrong in ("mcp/relative", f"{resource}#frag", "http://mcp.example.com/mcp", "https://u:p@mcp.example/x"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ask(b.stub, uid, wrong)
            bad.append(err.value.code())
        assert b.sample("token_broker_resource_denials_total", reason="not_allowed") == 2
    assert (
        errors[0] == errors[1] == (grpc.StatusCode.PERMISSION_DENIED, "caller is not allowed a token for this resource")
    )
    assert same.status == pb.TOKEN_STATUS_REFRESHED
    assert bad == [grpc.StatusCode.INVALID_ARGUMENT] * 4


async def test_passthrough_deny_refuses_a_request_without_a_resource(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, login = await logged_in(db, idp)
    env = {**broker_env(db, idp, BROKER_PASSTHROUGH="deny"), **files(tmp_path, [entry(resource)])}
    async with running_broker(env) as b:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ask(b.stub, uid)
        bound = await ask(b.stub, uid, resource)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "BROKER_PASSTHROUGH=deny" in (err.value.details() or "")
    assert bound.status == pb.TOKEN_STATUS_REFRESHED
    assert bound.access_token != login


async def test_a_rejected_exchanged_token_is_exchanged_again_once(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(db, idp)
    before = idp.stats()
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        first = await ask(b.stub, uid, resource)
        reports = await asyncio.gather(*(ask(b.stub, uid, resource, rejected=first.access_token) for _ in range(20)))
        stale_report = await ask(b.stub, uid, resource, rejected=first.access_token)
        second = reports[0].access_token
        guarded = await ask(b.stub, uid, resource, rejected=second)  # within BROKER_FORCED_REFRESH_INTERVAL
    assert {r.access_token for r in reports} == {second}  # one new exchange for every report of the same token
    assert {r.status for r in reports} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}
    assert second not in ("", first.access_token)
    assert (stale_report.status, stale_report.access_token) == (pb.TOKEN_STATUS_VALID, second)
    assert (guarded.status, guarded.access_token) == (pb.TOKEN_STATUS_EXCHANGE_DENIED, "")
    assert delta(before, idp.stats())["exchange_success"] == 2


async def test_the_audit_line_names_the_resource_and_whether_it_was_exchanged(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(db, idp)
    env = broker_env(db, idp, **files(tmp_path, [entry(resource)]))
    replica = BrokerProcess(env, tmp_path / "broker.log")
    try:
        async with grpc.aio.insecure_channel(replica.target) as channel:
            stub = pb_grpc.TokenBrokerStub(channel)
            tokens = [(await ask(stub, uid, resource)).access_token for _ in range(2)]
    finally:
        replica.stop()
    text = replica.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    audits = [line for line in lines if line.get("audit")]
    assert [(a["resource"], a["exchange"], a["status"]) for a in audits] == [
        (resource, "exchanged", "refreshed"),
        (resource, "cached", "valid"),
    ]
    assert all(t and t not in text for t in tokens)


async def test_exchanged_tokens_are_readable_only_by_the_elevated_role(db: Database) -> None:
    conn = await asyncpg.connect(db.service_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM token_broker.exchanged_tokens")
    finally:
        await conn.close()


async def test_exchanged_tokens_are_encrypted_at_rest_when_keys_are_configured(
    product_db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    key = os.urandom(32)
    nonce = os.urandom(12)
    test_value = base64.b64encode(nonce + AESGCM(key).encrypt(nonce, b"coder", None)).decode()
    await product_db.execute(
        "INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (1, $1, $2)", key_digest(key), test_value
    )
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(product_db, idp, users_table=True)
    env = broker_env(product_db, idp, BROKER_ENCRYPTION_KEYS=base64.b64encode(key).decode())
    async with running_broker({**env, **files(tmp_path, [entry(resource)])}) as b:
        first = await ask(b.stub, uid, resource)
        cached = await ask(b.stub, uid, resource)
    row = await product_db.fetchrow("SELECT access_token, access_key_id FROM token_broker.exchanged_tokens")
    assert row is not None
    assert row["access_key_id"] == key_digest(key)
    assert row["access_token"] != first.access_token
    assert first.access_token not in row["access_token"]
    assert (cached.status, cached.access_token) == (pb.TOKEN_STATUS_VALID, first.access_token)


async def test_the_exchange_is_an_idp_exchange_span_in_the_rpcs_trace(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, _ = await logged_in(db, idp)
    try:
        env = broker_env(db, idp, **files(tmp_path, [entry(resource)]))
        async with running_broker(env, tracer=OtelTracer(provider)) as b:
            answer = await ask(b.stub, uid, resource)
    finally:
        provider.shutdown()
    finished = {s.name: s for s in exporter.get_finished_spans()}
    server = finished["/broker.v1.TokenBroker/GetOIDCAccessToken"]
    span = finished["idp.exchange"]
    assert span.context.trace_id == server.context.trace_id
    assert span.attributes is not None
    assert span.attributes["token_broker.resource"] == resource
    assert server.attributes is not None
    assert server.attributes["token_broker.resource"] == resource
    assert answer.access_token not in json.dumps([dict(s.attributes or {}) for s in finished.values()])


async def test_the_python_client_and_the_chat_worker_ask_for_a_token_for_the_mcp_server(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, login = await logged_in(db, idp)
    env = broker_env(db, idp, **files(tmp_path, [entry(resource)]))
    async with (
        running_broker(env) as b,
        httpx2.AsyncClient(timeout=10) as http,
        TokenBrokerClient(b.target, caller_token=CHAT) as client,
    ):
        token = await client.get_token(str(uid), resource=resource)
        headers = await client.bearer_headers(str(uid), resource=resource)
        bound = await call_mcp(client, http, resource, str(uid), audience_bound=True)
        with SyncTokenBrokerClient(b.target, caller_token=CHAT) as sync:  # off the loop the server runs on
            same = await asyncio.to_thread(sync.get_token, str(uid), resource=resource)
        passthrough = await call_mcp(client, http, resource, str(uid))  # refused, reported, refused again
    assert token.status is TokenStatus.REFRESHED
    assert token.access_token != login
    assert headers == {"Authorization": f"Bearer {token.access_token}"}
    assert same.access_token == token.access_token
    assert bound == 200
    assert passthrough == 401  # the login token is refused by the MCP server, as the specification requires


async def test_the_go_and_node_clients_ask_for_a_token_for_the_mcp_server(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, login = await logged_in(db, idp)
    async with running_broker(broker_env(db, idp, **files(tmp_path, [entry(resource)]))) as b:
        env = {
            "TB_TARGET": b.target,
            "TB_RESOURCE": resource,
            "TB_CALLER_TOKEN": CHAT,
            "TB_USER": str(uid),
            "TB_LOGIN_TOKEN": login,
        }
        go = await asyncio.to_thread(
            run_go, "test", "-count=1", "-v", "-run", "TestAudienceBound", "./...", cwd=client_dir(), env=env
        )
        node = await asyncio.to_thread(
            subprocess.run,
            ["node", "--test", "--test-name-pattern", "audience-bound"],
            cwd=ROOT / "clients" / "node",
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert "--- PASS: TestAudienceBound" in go
    assert node.returncode == 0, node.stdout + node.stderr
    assert "# fail 0" in node.stdout
    tokens = {line.split("=", 1)[1] for line in (go + node.stdout).splitlines() if line.startswith("TB_BOUND_TOKEN=")}
    assert len(tokens) == 1  # both were served the one exchanged token
    assert mcp.call(resource, tokens.pop()) == 200


async def test_a_broker_client_the_idp_refuses_is_exchange_denied_and_logged_for_the_operator(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resource = mcp.resource()
    idp.allow_exchange(resource)
    uid, login = await logged_in(db, idp)
    env = {**broker_env(db, idp, BROKER_OIDC_CLIENT_SECRET="not-the-secret"), **files(tmp_path, [entry(resource)])}
    async with running_broker(env) as b:
        answer = await ask(b.stub, uid, resource)
        assert b.sample("token_broker_exchanges_total", result="denied") == 1
    assert (answer.status, answer.access_token) == (pb.TOKEN_STATUS_EXCHANGE_DENIED, "")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "broker.idp"]
    assert any("invalid_client" in m and "client's credentials" in m for m in errors)
    assert "not-the-secret" not in caplog.text
    assert login not in caplog.text


async def test_the_policy_file_is_reloaded_when_it_changes_and_a_bad_edit_keeps_the_policy_in_force(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, added = mcp.resource(), mcp.resource()
    idp.allow_exchange(first)
    idp.allow_exchange(added)
    uid, _ = await logged_in(db, idp)
    env = broker_env(db, idp, **files(tmp_path, [entry(first)]))
    policy = Path(env["BROKER_RESOURCES_FILE"])

    async def status_for(resource: str) -> grpc.StatusCode:
        try:
            await ask(b.stub, uid, resource)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    async def until(resource: str, code: grpc.StatusCode) -> grpc.StatusCode:
        deadline = time.monotonic() + 15
        seen = await status_for(resource)
        while seen != code and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            seen = await status_for(resource)
        return seen

    async with running_broker(env) as b:
        assert await status_for(added) == grpc.StatusCode.PERMISSION_DENIED
        policy.write_text(yaml.safe_dump({"resources": [entry(first), entry(added)]}))
        assert await until(added, grpc.StatusCode.OK) == grpc.StatusCode.OK
        policy.write_text("resources: [\n  - resource: http://not-https.example/mcp\n")  # half-written, and wrong
        deadline = time.monotonic() + 15
        while "resource policy not reloaded" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            assert await status_for(added) == grpc.StatusCode.OK  # the policy in force stays
        policy.write_text(yaml.safe_dump({"resources": [entry(added)]}))
        assert await until(first, grpc.StatusCode.PERMISSION_DENIED) == grpc.StatusCode.PERMISSION_DENIED
    assert "resource policy not reloaded" in caplog.text


async def test_an_mcp_server_whose_metadata_names_another_issuer_is_warned_about_at_start_up(
    db: Database, idp: OidcTestProvider, mcp: McpStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours, foreign = mcp.resource(), mcp.resource("foreign")
    env = broker_env(db, idp, **files(tmp_path, [entry(ours), entry(foreign)]))
    async with running_broker(env):
        deadline = time.monotonic() + 15
        while "does not name this broker's issuer" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "broker.resources"]
    assert len(warnings) == 1
    assert foreign in warnings[0]
    assert "https://other-idp.example.com" in warnings[0]
