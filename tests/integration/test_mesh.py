"""Caller identity from a service mesh's sidecar (#14): the header as the local sidecar sets it is the caller's
identity; from any other peer it is ignored. No Envoy build is in the registries this project reaches, so the test
plays the sidecar: a loopback client sets the header; a relay whose connections come from 127.0.0.2 plays a
caller on another address that forges it."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import broker_env, call_broker, running_broker
from tests.support.pg import Database
from tests.support.proxy import FaultyProxy

WORKER = "spiffe://cluster.local/ns/chat/sa/worker"
XFCC = f'By=spiffe://cluster.local/ns/auth/sa/token-broker;Hash=4a1b;Subject="";URI={WORKER}'


async def call(target: str, uid: uuid.UUID, metadata: tuple[tuple[str, str], ...]) -> pb.GetOIDCAccessTokenResponse:
    return await call_broker(target, uid, metadata=metadata)


async def seeded(db: Database) -> uuid.UUID:
    uid = uuid.uuid4()
    await db.insert_link(uid, "mesh-token", "r", datetime.now(UTC) + timedelta(hours=1))
    return uid


async def test_the_sidecars_xfcc_is_the_callers_identity(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    uid = await seeded(db)
    env = broker_env(db, BROKER_TRUSTED_PROXY_IDENTITY="xfcc", BROKER_ALLOWED_CALLERS=WORKER)
    with caplog.at_level(logging.INFO, logger="broker.audit"):
        async with running_broker(env) as b:
            ok = await call(b.target, uid, (("x-forwarded-client-cert", XFCC),))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await call(b.target, uid, ())
            other = XFCC.replace("sa/worker", "sa/stranger")
            with pytest.raises(grpc.aio.AioRpcError) as stranger:
                await call(b.target, uid, (("x-forwarded-client-cert", other),))
            with pytest.raises(grpc.aio.AioRpcError) as malformed:
                await call(b.target, uid, (("x-forwarded-client-cert", 'URI="unterminated'),))
    assert ok.access_token == "mesh-token"
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stranger.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert malformed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    audits = [r for r in caplog.records if r.name == "broker.audit"]
    assert getattr(audits[0], "caller", None) == f"uri:{WORKER}"


async def test_identities_a_client_certificate_fabricates_are_refused(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """What Envoy writes for certificates whose SANs carry separators (#21): a URI SAN `spiffe://evil/x;URI=<worker>`,
    and an APPEND_FORWARD prefix ending in an open quote that would merge into the sidecar's element. Neither is the
    worker: UNAUTHENTICATED, one WARNING; the honest header still passes."""
    uid = await seeded(db)
    env = broker_env(db, BROKER_TRUSTED_PROXY_IDENTITY="xfcc", BROKER_ALLOWED_CALLERS=WORKER)
    sidecar = "By=spiffe://cluster.local/ns/auth/sa/token-broker;Hash=4a1b"
    forged = [
        f'{sidecar};Subject="";URI=spiffe://evil.example/x;URI={WORKER}',
        f'URI={WORKER};Subject=",{sidecar};Subject="CN=x\\"";DNS=evil.example',
    ]
    with caplog.at_level(logging.WARNING, logger="broker.auth"):
        async with running_broker(env) as b:
            for header in forged * 2:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(b.target, uid, (("x-forwarded-client-cert", header),))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await call(b.target, uid, (("x-forwarded-client-cert", XFCC),))
    assert ok.access_token == "mesh-token"
    refusals = [r.getMessage() for r in caplog.records if "refusing x-forwarded-client-cert" in r.getMessage()]
    assert len(refusals) == 1
    assert WORKER not in refusals[0]


async def test_a_header_from_another_address_is_ignored_logged_once_and_counted(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    uid = await seeded(db)
    env = broker_env(db, BROKER_TRUSTED_PROXY_IDENTITY="xfcc", BROKER_ALLOWED_CALLERS=WORKER)
    async with running_broker(env) as b:
        relay = await FaultyProxy("127.0.0.1", b.app.port, source_host="127.0.0.2").start()
        try:
            with caplog.at_level(logging.WARNING):
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(f"127.0.0.1:{relay.port}", uid, (("x-forwarded-client-cert", XFCC),))
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await relay.close()
        assert b.sample("token_broker_untrusted_identity_headers_total") == 3
    warnings = [r for r in caplog.records if "ignoring x-forwarded-client-cert" in r.getMessage()]
    assert len(warnings) == 1
    assert "127.0.0.2" in warnings[0].getMessage()


async def test_linkerd_client_id(db: Database) -> None:
    uid = await seeded(db)
    ident = "worker.chat.serviceaccount.identity.linkerd.cluster.local"
    env = broker_env(db, BROKER_TRUSTED_PROXY_IDENTITY="l5d", BROKER_ALLOWED_CALLERS=f"dns:{ident}")
    async with running_broker(env) as b:
        ok = await call(b.target, uid, (("l5d-client-id", ident),))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b.target, uid, (("l5d-client-id", "other.ns.serviceaccount.identity.linkerd.cluster.local"),))
    assert ok.access_token == "mesh-token"
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_mesh_mode_does_not_lift_the_non_loopback_refusal() -> None:
    from broker.config import Settings
    from broker.errors import ConfigError

    with pytest.raises(ConfigError, match="refusing the non-loopback address"):
        Settings.from_env(
            {
                "BROKER_DATABASE_URL": "postgresql://x@h/d",
                "BROKER_LISTEN": "0.0.0.0:50051",
                "BROKER_TRUSTED_PROXY_IDENTITY": "xfcc",
            }
        )
    with pytest.raises(ConfigError, match=r"BROKER_TRUSTED_PROXY_ADDRESSES: 10\.0\.0\.1 is not a loopback"):
        Settings.from_env({"BROKER_DATABASE_URL": "postgresql://x@h/d", "BROKER_TRUSTED_PROXY_ADDRESSES": "10.0.0.1"})
