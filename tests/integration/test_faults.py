"""Faults as an operator meets them (#11): SIGTERM under load, a silent database, killed backends, PgBouncer, a
crashed replica, hostile bytes. Each scenario is bounded in time and counts what callers saw."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env, running_broker
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database
from tests.support.pgbouncer import PgBouncer
from tests.support.pgbouncer import available as pgbouncer_available
from tests.support.proxy import proxied
from tests.support.token_endpoint import TokenEndpoint


async def expired_user(db: Database, idp: OidcTestProvider) -> tuple[uuid.UUID, str]:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(minutes=5))
    return uid, issued.access_token


async def hammer(
    target: str, uid: uuid.UUID, callers: int, until: asyncio.Event, latencies: list[float] | None = None
) -> collections.Counter[str]:
    """`callers` concurrent callers on 5 channels, each calling in a loop until `until` is set; codes counted."""
    codes: collections.Counter[str] = collections.Counter()
    channels = [grpc.aio.insecure_channel(target) for _ in range(5)]
    request = pb.GetOIDCAccessTokenRequest(user_id=str(uid))

    async def caller(i: int) -> None:
        stub = pb_grpc.TokenBrokerStub(channels[i % len(channels)])
        while not until.is_set():
            started = time.monotonic()
            try:
                r = await stub.GetOIDCAccessToken(request, timeout=30)
                if latencies is not None:
                    latencies.append(time.monotonic() - started)
                codes["OK" if r.access_token else pb.TokenStatus.Name(r.status)] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    for ch in channels:
        await ch.close()
    return codes


async def test_sigterm_under_load_ends_no_call_but_ok_or_unavailable(db: Database, tmp_path: Path) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    broker = BrokerProcess(broker_env(db, BROKER_SHUTDOWN_GRACE="5"), tmp_path / "broker.log")
    until = asyncio.Event()
    load = asyncio.create_task(hammer(broker.target, uid, 50, until))
    await asyncio.sleep(1.5)
    started = time.monotonic()
    broker.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(broker.proc.wait, 15)
    stopped_in = time.monotonic() - started
    await asyncio.sleep(0.5)  # callers now meet a closed port
    until.set()
    codes = await load
    broker.stop()
    print(f"\nSIGTERM under 50 callers: {dict(codes)}; exited {rc} in {stopped_in:.2f}s")
    assert rc == 0
    assert stopped_in < 5
    assert codes["OK"] > 100
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


# -- hostile bytes ------------------------------------------------------------------------------------------------


async def test_bytes_that_are_not_a_request_are_invalid_argument(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    cases = {
        "not protobuf": b"\xff\xff\xff\xff",
        "truncated": b"\x0a\x24" + b"8d1f2c6e",
        "invalid utf-8 in user_id": b"\x0a\x03\xff\xfe\xfd",
    }
    with caplog.at_level(logging.INFO):
        async with running_broker(broker_env(db)) as b:
            raw = b.channel.unary_unary(
                "/broker.v1.TokenBroker/GetOIDCAccessToken",
                request_serializer=lambda body: body,
                response_deserializer=pb.GetOIDCAccessTokenResponse.FromString,
            )
            for name, body in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw(body, timeout=3)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert err.value.details() == "request body is not a valid protobuf message"
            handled = b.sample("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT")
    assert handled == len(cases)
    warnings = [r for r in caplog.records if "not a valid message" in r.getMessage()]
    assert len(warnings) == len(cases)
    assert all(r.levelname == "WARNING" for r in warnings)
    assert not any(r.exc_info for r in caplog.records)  # no traceback
    audits = [r for r in caplog.records if r.name == "broker.audit"]
    assert [getattr(r, "grpc_code", None) for r in audits] == ["INVALID_ARGUMENT"] * len(cases)
    assert "\\xff" not in caplog.text
    assert "8d1f2c6e" not in caplog.text


# -- killed backends ----------------------------------------------------------------------------------------------


async def test_killing_every_pool_connection_under_load_fails_no_request(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    async with running_broker(broker_env(db, BROKER_DB_POOL_MIN="10", BROKER_DB_POOL_MAX="10")) as b:
        until = asyncio.Event()
        load = asyncio.create_task(hammer(b.target, uid, 50, until))
        await asyncio.sleep(1.0)
        admin = await db.admin()
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = 'token-broker'",
                db.name,
            )
        finally:
            await admin.close()
        await asyncio.sleep(1.5)
        until.set()
        codes = await load
    print(f"\nkilled {killed} backends under 50 callers: {dict(codes)}")
    assert killed >= 5
    assert set(codes) == {"OK"}, codes


# -- a silent network ---------------------------------------------------------------------------------------------


async def test_a_silent_database_network_is_answered_within_the_request_timeout(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    async with proxied(db) as (proxy, url):
        env = broker_env(db, BROKER_DATABASE_URL=url, BROKER_REQUEST_TIMEOUT="2", BROKER_HEALTH_INTERVAL="60")
        async with running_broker(env) as b:
            until = asyncio.Event()
            latencies: list[float] = []
            load = asyncio.create_task(hammer(b.target, uid, 20, until, latencies))
            await asyncio.sleep(0.5)
            proxy.silence()
            await asyncio.sleep(5.0)
            proxy.heal()
            await asyncio.sleep(2.5)
            until.set()
            codes = await load
            after = await b.get(uid)
    print(f"\n5 s silent partition, 20 callers: {dict(codes)}, max latency {max(latencies):.2f}s")
    assert max(latencies) < 2.5
    assert set(codes) <= {"OK", "TOKEN_STATUS_STORE_UNAVAILABLE"}
    assert codes["TOKEN_STATUS_STORE_UNAVAILABLE"] > 0
    assert (after.status, after.access_token) == (pb.TOKEN_STATUS_VALID, "tok")  # recovered


# -- PgBouncer in transaction pooling -----------------------------------------------------------------------------


@pytest.fixture
def bouncer(db: Database) -> Iterator[PgBouncer]:
    if not pgbouncer_available():
        pytest.fail("pgbouncer is not installed (`make test` installs Debian's package)")
    pb_ = PgBouncer(db.admin_url, db.name, ["token_broker", "postgres"])
    yield pb_
    pb_.stop()


async def test_pgbouncer_transaction_pooling_valid_refresh_and_stampedes(
    db: Database, idp: OidcTestProvider, bouncer: PgBouncer, tmp_path: Path
) -> None:
    env = broker_env(db, idp, BROKER_DATABASE_URL=bouncer.url(db.service_url), BROKER_DB_STATEMENT_CACHE="false")
    valid = uuid.uuid4()
    await db.insert_link(valid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    stampede, old = await expired_user(db, idp)
    replicas_user, _ = await expired_user(db, idp)
    before = idp.stats()
    async with running_broker(env) as b:
        answers = await asyncio.gather(*(b.get(valid) for _ in range(200)))
        assert {(a.status, a.access_token) for a in answers} == {(pb.TOKEN_STATUS_VALID, "tok")}
        crowd = await asyncio.gather(*(b.get(stampede, timeout=20) for _ in range(100)))
    assert len({a.access_token for a in crowd}) == 1
    assert old not in {a.access_token for a in crowd}
    assert {a.status for a in crowd} <= {pb.TOKEN_STATUS_REFRESHED, pb.TOKEN_STATUS_VALID}
    replicas = [BrokerProcess(env, tmp_path / f"r{i}.log") for i in range(2)]
    try:
        channels = [grpc.aio.insecure_channel(r.target) for r in replicas]
        request = pb.GetOIDCAccessTokenRequest(user_id=str(replicas_user))
        both = await asyncio.gather(
            *(pb_grpc.TokenBrokerStub(c).GetOIDCAccessToken(request, timeout=20) for c in channels for _ in range(50))
        )
        for c in channels:
            await c.close()
    finally:
        for r in replicas:
            r.stop()
    assert len({a.access_token for a in both}) == 1
    assert "" not in {a.access_token for a in both}
    d = {k: idp.stats()[k] - before[k] for k in before}
    assert (d["refresh_success"], d["invalid_grant"], d["grants_revoked"]) == (2, 0, 0)


# -- a crashed replica --------------------------------------------------------------------------------------------


async def _crash_while_refreshing(
    db: Database, env: dict[str, str], uid: uuid.UUID, tmp_path: Path, *, after_answer: bool
) -> tuple[pb.GetOIDCAccessTokenResponse, float]:
    """Replica A (a process) starts the refresh and is SIGKILLed while the grant is at the IdP, or after the IdP
    answered but before A could write; replica B is asked until it answers something other than IDP_UNAVAILABLE.
    Returns B's answer and how long after the kill it came."""
    async with proxied(db) as (proxy, url):
        # Started from a thread: its readiness wait must not block the loop the proxy runs on.
        a = await asyncio.to_thread(BrokerProcess, {**env, "BROKER_DATABASE_URL": url}, tmp_path / "a.log")
        try:
            async with grpc.aio.insecure_channel(a.target) as ch:
                call = pb_grpc.TokenBrokerStub(ch).GetOIDCAccessToken(
                    pb.GetOIDCAccessTokenRequest(user_id=str(uid)), timeout=10
                )
                task = asyncio.ensure_future(call)
                await asyncio.sleep(0.5)  # A holds the lock; its grant is at the IdP (which answers after 1 s)
                if after_answer:
                    proxy.silence()  # A's write will hang: the IdP's answer reaches A, the database never does
                    await asyncio.sleep(1.0)
                a.kill()
                proxy.cut()  # the dead pod's connections close
                killed_at = time.monotonic()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await task
        finally:
            a.stop()
    async with running_broker(env) as b:
        while True:
            r = await b.get(uid)
            if r.status != pb.TOKEN_STATUS_IDP_UNAVAILABLE or time.monotonic() - killed_at > 30:
                return r, time.monotonic() - killed_at
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("after_answer", [False, True], ids=["killed-at-the-idp", "killed-after-the-answer"])
async def test_a_crashed_holder_with_an_idp_rotation_grace_keeps_the_user_logged_in(
    db: Database, tmp_path: Path, after_answer: bool
) -> None:
    endpoint = TokenEndpoint(grace=30)
    try:
        endpoint.token_delay = 1.0
        access, refresh = endpoint.issue()
        uid = uuid.uuid4()
        await db.insert_link(uid, access, refresh, datetime.now(UTC) - timedelta(minutes=5))
        env = broker_env(db)
        env.update(
            BROKER_OIDC_ISSUER=endpoint.issuer, BROKER_OIDC_CLIENT_ID="broker", BROKER_OIDC_CLIENT_SECRET="secret"
        )
        r, took = await _crash_while_refreshing(db, env, uid, tmp_path, after_answer=after_answer)
    finally:
        endpoint.close()
    print(f"\nwith grace, {'after the answer' if after_answer else 'at the IdP'}: {r.status} after {took:.1f}s")
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    assert took < 5
    assert endpoint.sent == [refresh, refresh]  # exactly one resend for the dead marker
    assert endpoint.reused == 0


@pytest.mark.parametrize("after_answer", [False, True], ids=["killed-at-the-idp", "killed-after-the-answer"])
async def test_a_crashed_holder_without_grace_converges_within_seconds(
    db: Database, idp: OidcTestProvider, tmp_path: Path, after_answer: bool
) -> None:
    uid, _ = await expired_user(db, idp)
    env = broker_env(db, idp, BROKER_OIDC_TOKEN_URL=idp.token_url)
    idp.set_fault("ok", delay_ms=1000)
    before = idp.stats()
    try:
        r, took = await _crash_while_refreshing(db, env, uid, tmp_path, after_answer=after_answer)
    finally:
        idp.set_fault("ok")
    d = {k: idp.stats()[k] - before[k] for k in before}
    print(f"\nwithout grace, {'after the answer' if after_answer else 'at the IdP'}: {r.status} after {took:.1f}s; {d}")
    assert took < 5
    assert d["token_requests"] == 2  # never more than one send per dead marker
    if after_answer:
        # A's grant rotated the token and the new one died with A: the one resend is a reuse, the grant is revoked.
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
        assert (d["refresh_success"], d["grants_revoked"]) == (1, 1)
    else:
        # oidc-provider drops a grant whose client went away before it answered: the token was never rotated, and
        # the one resend succeeds.
        assert r.status == pb.TOKEN_STATUS_REFRESHED
        assert (d["refresh_success"], d["grants_revoked"]) == (1, 0)
