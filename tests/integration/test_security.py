"""Let no one in: TLS, mutual TLS with a SAN allowlist, caller tokens, safe defaults, audit, account state."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.app import App
from broker.config import Settings
from broker.errors import ConfigError
from broker.model import Link
from broker.postgres.store import PostgresStore
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import broker_env, call_broker, postgres_store, running_broker
from tests.support.certs import CertificateAuthority
from tests.support.pg import Database

WORKER = "spiffe://cluster.local/ns/chat/sa/worker"
STRANGER = "spiffe://cluster.local/ns/other/sa/stranger"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | bytes]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority("broker-test-ca"), CertificateAuthority("other-ca")
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "other-ca.crt").write_bytes(other.pem)
    ca.issue("broker", dns=["localhost"], ips=["127.0.0.1"], server=True).write(d, "server")
    other.issue("broker", dns=["localhost"], ips=["127.0.0.1"], server=True).write(d, "server-other")
    ca.issue("worker", uris=[WORKER]).write(d, "worker")
    ca.issue("dns-worker", dns=["mcp-gateway.chat.svc.cluster.local"]).write(d, "dns-worker")
    ca.issue("stranger", uris=[STRANGER]).write(d, "stranger")
    # The review's forgeries: a DNS SAN that equals an allowed token name, a URI SAN spelled like a token identity.
    ca.issue("dns-named-like-a-token", dns=["chat-worker"]).write(d, "dns-token-name")
    ca.issue("uri-token-forgery", uris=["token:chat-worker"]).write(d, "uri-token")
    other.issue("imposter", uris=[WORKER]).write(d, "imposter")
    return {"dir": d, "ca": ca.pem, "other_ca": other.pem}


def _creds(pki: dict[str, Path | bytes], client: str | None, trust: str = "ca") -> grpc.ChannelCredentials:
    d = pki["dir"]
    assert isinstance(d, Path)
    root = pki[trust]
    assert isinstance(root, bytes)
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=(d / f"{client}.key").read_bytes(),
        certificate_chain=(d / f"{client}.crt").read_bytes(),
    )


@asynccontextmanager
async def tls_broker(db: Database, pki: dict[str, Path | bytes], **env: str) -> AsyncIterator[App]:
    d = pki["dir"]
    assert isinstance(d, Path)
    full = broker_env(
        db,
        BROKER_TLS_CERT_FILE=str(d / "server.crt"),
        BROKER_TLS_KEY_FILE=str(d / "server.key"),
        BROKER_TLS_CLIENT_CA_FILE=str(d / "ca.crt"),
        BROKER_ALLOWED_CALLERS=f"{WORKER},dns:mcp-gateway.chat.svc.cluster.local",
        BROKER_HEALTH_LISTEN="127.0.0.1:0",
    )
    full.update(env)
    app = App(Settings.from_env(full))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def _call(
    port: int,
    creds: grpc.ChannelCredentials,
    user: uuid.UUID,
    token: str | None = None,
) -> pb.GetOIDCAccessTokenResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return await call_broker(f"127.0.0.1:{port}", user, credentials=creds, metadata=metadata, timeout=3)


async def _seed(db: Database) -> uuid.UUID:
    uid = uuid.uuid4()
    await db.insert_link(uid, "mtls-token", "r", datetime.now(UTC) + timedelta(hours=1))
    return uid


async def test_allowed_uri_san_gets_the_token(db: Database, pki: dict[str, Path | bytes]) -> None:
    uid = await _seed(db)
    async with tls_broker(db, pki) as app:
        r = await _call(app.port, _creds(pki, "worker"), uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "mtls-token")


async def test_allowed_dns_san_gets_the_token(db: Database, pki: dict[str, Path | bytes]) -> None:
    uid = await _seed(db)
    async with tls_broker(db, pki) as app:
        r = await _call(app.port, _creds(pki, "dns-worker"), uid)
    assert r.access_token == "mtls-token"


@pytest.mark.parametrize("client", [None, "imposter"])
async def test_handshake_fails_without_a_certificate_from_the_ca(
    db: Database, pki: dict[str, Path | bytes], client: str | None
) -> None:
    uid = await _seed(db)
    async with tls_broker(db, pki) as app:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(app.port, _creds(pki, client), uid)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake itself fails


async def test_valid_certificate_with_a_san_not_allowed_is_permission_denied(
    db: Database, pki: dict[str, Path | bytes]
) -> None:
    uid = await _seed(db)
    async with tls_broker(db, pki) as app:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(app.port, _creds(pki, "stranger"), uid)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("client", ["dns-token-name", "uri-token"])
async def test_a_certificate_cannot_pass_for_a_caller_token(
    db: Database, pki: dict[str, Path | bytes], tokens_file: Path, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Identity kinds are distinct: `token:chat-worker` is allowed, and neither a DNS SAN `chat-worker` nor a URI
    SAN `token:chat-worker` is that identity (nor can it forge the audit line)."""
    uid = await _seed(db)
    allowed = f"{WORKER},token:chat-worker"
    with caplog.at_level(logging.INFO, logger="broker.audit"):
        async with tls_broker(db, pki, BROKER_ALLOWED_CALLERS=allowed, BROKER_CALLER_TOKENS_FILE=str(tokens_file)) as a:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call(a.port, _creds(pki, client), uid)
            ok = await _call(a.port, _creds(pki, "worker"), uid, token="worker-secret-token")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ok.access_token == "mtls-token"
    callers = [getattr(r, "caller", None) for r in caplog.records if r.name == "broker.audit"]
    assert callers == [None, f"uri:{WORKER}"]


def test_an_allowlist_entry_without_a_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'chat-worker' has no kind: write dns:chat-worker .* token:chat-worker"):
        Settings.from_env({"BROKER_DATABASE_URL": "postgresql://x@h/d", "BROKER_ALLOWED_CALLERS": "chat-worker"})
    s = Settings.from_env(
        {"BROKER_DATABASE_URL": "postgresql://x@h/d", "BROKER_ALLOWED_CALLERS": f"{WORKER}, dns:a.example, token:b"}
    )
    assert s.allowed_callers == {f"uri:{WORKER}", "dns:a.example", "token:b"}


async def test_plaintext_client_cannot_talk_to_a_tls_port(db: Database, pki: dict[str, Path | bytes]) -> None:
    async with tls_broker(db, pki) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.TokenBrokerStub(ch).GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(uuid.uuid4())), timeout=2
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_stays_open_on_the_probe_port(db: Database, pki: dict[str, Path | bytes]) -> None:
    async with tls_broker(db, pki) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_certificate_rotation_is_picked_up_without_restart(
    db: Database, pki: dict[str, Path | bytes], tmp_path: Path
) -> None:
    d = pki["dir"]
    assert isinstance(d, Path)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes((d / "server.crt").read_bytes())
    key.write_bytes((d / "server.key").read_bytes())
    uid = await _seed(db)
    async with tls_broker(db, pki, BROKER_TLS_CERT_FILE=str(cert), BROKER_TLS_KEY_FILE=str(key)) as app:
        assert (await _call(app.port, _creds(pki, "worker"), uid)).access_token == "mtls-token"
        # cert-manager rotates in place: the new server certificate comes from another CA.
        key.write_bytes((d / "server-other.key").read_bytes())
        cert.write_bytes((d / "server-other.crt").read_bytes())
        os.utime(cert, ns=(cert.stat().st_atime_ns, cert.stat().st_mtime_ns + 1_000_000))
        r = await _call(app.port, _creds(pki, "worker", trust="other_ca"), uid)
        assert r.access_token == "mtls-token"
        with pytest.raises(grpc.aio.AioRpcError):
            await _call(app.port, _creds(pki, "worker", trust="ca"), uid)
        assert app.certificates is not None
        assert app.certificates.reloads >= 1


# -- caller tokens ------------------------------------------------------------------------------------------------


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers"
    digest = hashlib.sha256(b"worker-secret-token").hexdigest()
    path.write_text(f"# chat workers\nchat-worker:{digest}\nbilling:{hashlib.sha256(b'billing-token').hexdigest()}\n")
    return path


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("worker-secret-token", None),
        ("wrong-token", grpc.StatusCode.UNAUTHENTICATED),
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("billing-token", grpc.StatusCode.PERMISSION_DENIED),  # a valid token whose name is not allowed
    ],
)
async def test_caller_tokens(db: Database, tokens_file: Path, token: str | None, code: grpc.StatusCode | None) -> None:
    uid = await _seed(db)
    env = broker_env(db, BROKER_CALLER_TOKENS_FILE=str(tokens_file), BROKER_ALLOWED_CALLERS="token:chat-worker")
    async with running_broker(env) as b:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        call = b.stub.GetOIDCAccessToken(pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=3, metadata=metadata)
        if code is None:
            assert (await call).access_token == "mtls-token"
        else:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code
            assert "mtls-token" not in str(err.value)


async def test_authentication_is_decided_before_any_database_access(db: Database, tokens_file: Path) -> None:
    env = broker_env(db, BROKER_CALLER_TOKENS_FILE=str(tokens_file))
    async with running_broker(env) as b:
        await db.set_reachable(False)  # any database access would now fail as STORE_UNAVAILABLE
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await b.get(uuid.uuid4())
        finally:
            await db.set_reachable(True)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


class HeldReads:
    """A LinkStore over the real one whose reads wait for `gate`: calls stay in flight on cue."""

    def __init__(self, inner: PostgresStore, gate: asyncio.Event) -> None:
        self.inner, self.gate = inner, gate
        self.lock_link, self.save_refreshed = inner.lock_link, inner.save_refreshed
        self.heartbeat, self.ping, self.dbcrypt_keys = inner.heartbeat, inner.ping, inner.dbcrypt_keys
        self.note_reauth_required, self.note_recovered = inner.note_reauth_required, inner.note_recovered

    async def get_link(self, user_id: uuid.UUID, *, timeout: float) -> Link | None:
        await self.gate.wait()
        return await self.inner.get_link(user_id, timeout=timeout)


async def test_per_caller_concurrency_limit(db: Database, tokens_file: Path) -> None:
    uid = await _seed(db)
    env = broker_env(db, BROKER_CALLER_TOKENS_FILE=str(tokens_file), BROKER_MAX_CONCURRENT_PER_CALLER="2")
    gate = asyncio.Event()
    async with postgres_store(db) as store, running_broker(env, store=HeldReads(store, gate)) as b:
        md = (("authorization", "Bearer worker-secret-token"),)
        req = pb.GetOIDCAccessTokenRequest(user_id=str(uid))
        held = [asyncio.ensure_future(b.stub.GetOIDCAccessToken(req, timeout=5, metadata=md)) for _ in range(2)]
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await b.stub.GetOIDCAccessToken(req, timeout=5, metadata=md)
        other = asyncio.ensure_future(
            b.stub.GetOIDCAccessToken(req, timeout=5, metadata=(("authorization", "Bearer billing-token"),))
        )
        gate.set()
        assert all(r.access_token == "mtls-token" for r in await asyncio.gather(*held, other))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_malformed_tokens_file_refuses_to_start(db: Database, tmp_path: Path) -> None:
    bad = tmp_path / "callers"
    bad.write_text("chat-worker:not-hex\n")
    app = App(Settings.from_env(broker_env(db, BROKER_CALLER_TOKENS_FILE=str(bad))))
    with pytest.raises(ConfigError, match="BROKER_CALLER_TOKENS_FILE line 1"):
        asyncio.run(app.start())


def test_mutual_tls_requires_an_allowlist(pki: dict[str, Path | bytes]) -> None:
    d = pki["dir"]
    assert isinstance(d, Path)
    with pytest.raises(ConfigError, match="BROKER_ALLOWED_CALLERS"):
        Settings.from_env(
            {
                "BROKER_DATABASE_URL": "postgresql://x@h/d",
                "BROKER_TLS_CERT_FILE": str(d / "server.crt"),
                "BROKER_TLS_KEY_FILE": str(d / "server.key"),
                "BROKER_TLS_CLIENT_CA_FILE": str(d / "ca.crt"),
            }
        )


async def test_audit_line_names_the_caller_and_holds_no_token(
    db: Database, tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uid = await _seed(db)
    env = broker_env(db, BROKER_CALLER_TOKENS_FILE=str(tokens_file))
    with caplog.at_level(logging.INFO, logger="broker.audit"):
        async with running_broker(env) as b:
            await b.stub.GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(uid)),
                timeout=3,
                metadata=(("authorization", "Bearer worker-secret-token"),),
            )
    audits = [r for r in caplog.records if r.name == "broker.audit"]
    assert len(audits) == 1
    a = audits[0]
    assert (a.caller, a.user_id, a.status, a.refreshed) == ("token:chat-worker", str(uid), "valid", False)  # type: ignore[attr-defined]
    text = caplog.text + repr(a.__dict__)
    assert "mtls-token" not in text
    assert "worker-secret-token" not in text


# -- account state ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "deleted", "served"),
    [("active", False, True), ("dormant", False, True), ("suspended", False, False), ("active", True, False)],
)
async def test_suspended_and_deleted_users_get_no_token(
    product_db: Database, status: str, deleted: bool, served: bool
) -> None:
    uid = uuid.uuid4()
    await product_db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'u@example.com', 'u')", uid)
    await product_db.insert_link(uid, "account-token", "r", datetime.now(UTC) + timedelta(hours=1))
    await product_db.execute(
        "UPDATE users SET status = $2::user_status, deleted = $3 WHERE id = $1", uid, status, deleted
    )
    async with running_broker(broker_env(product_db)) as b:
        r = await b.get(uid)
    if served:
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "account-token")
    else:
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_ACCOUNT_DISABLED, "")
