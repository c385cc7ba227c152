"""A token the upstream rejected (#13): the caller reports its SHA-256 and gets a refreshed one, deduplicated across
callers and replicas, bounded against refresh loops. Grants are counted by oidc-provider itself."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, RunningBroker, broker_env, call_broker, running_broker, warm_discovery
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


async def report(b: RunningBroker, uid: uuid.UUID, token: str) -> pb.GetOIDCAccessTokenResponse:
    response: pb.GetOIDCAccessTokenResponse = await b.stub.GetOIDCAccessToken(
        pb.GetOIDCAccessTokenRequest(user_id=str(uid), rejected_token_sha256=sha(token)), timeout=10
    )
    return response


async def fresh_user(db: Database, idp: OidcTestProvider) -> tuple[uuid.UUID, str]:
    """A user whose stored token is valid for another hour (the broker alone would not refresh it)."""
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(hours=1))
    return uid, issued.access_token


async def test_a_token_the_upstream_refuses_is_replaced(db: Database, idp: OidcTestProvider) -> None:
    """The IdP still considers the token active (the upstream's clock is ahead, say); the broker cannot know."""
    uid, token = await fresh_user(db, idp)
    before = idp.stats()
    async with running_broker(broker_env(db, idp)) as b:
        assert (await b.get(uid)).access_token == token  # valid for an hour: served as it is
        r = await report(b, uid, token)
        assert b.sample("token_broker_forced_refreshes_total", result="refreshed") == 1
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    assert r.access_token not in ("", token)
    assert idp.active(r.access_token)
    assert delta(before, idp.stats())["refresh_success"] == 1


async def test_a_token_revoked_at_the_idp_ends_in_reauth_required(db: Database, idp: OidcTestProvider) -> None:
    """oidc-provider's revocation endpoint revokes every token of the grant, the refresh token too: the forced
    refresh is rejected and the user must log in again (and the rejected token is never handed out again)."""
    uid, token = await fresh_user(db, idp)
    idp.revoke(token)
    assert not idp.active(token)
    async with running_broker(broker_env(db, idp)) as b:
        r = await report(b, uid, token)
        later = await b.get(uid)  # still stored and unexpired, but rejected: not served
        again = await report(b, uid, token)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert (later.status, later.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert (again.status, again.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")


async def test_300_reports_across_two_replicas_make_one_grant(
    db: Database, idp: OidcTestProvider, tmp_path: Path
) -> None:
    uid, token = await fresh_user(db, idp)
    replicas = [BrokerProcess(broker_env(db, idp), tmp_path / f"r{i}.log") for i in range(2)]
    before = idp.stats()
    try:
        channels = [grpc.aio.insecure_channel(r.target) for r in replicas]
        request = pb.GetOIDCAccessTokenRequest(user_id=str(uid), rejected_token_sha256=sha(token))
        answers = await asyncio.gather(
            *(pb_grpc.TokenBrokerStub(c).GetOIDCAccessToken(request, timeout=20) for c in channels for _ in range(150))
        )
        for c in channels:
            await c.close()
    finally:
        for r in replicas:
            r.stop()
    d = delta(before, idp.stats())
    assert (d["refresh_success"], d["invalid_grant"], d["grants_revoked"]) == (1, 0, 0)
    tokens = {a.access_token for a in answers}
    assert len(tokens) == 1
    assert tokens.isdisjoint({"", token})


async def test_a_stale_report_gets_the_current_token_without_an_idp_call(db: Database, idp: OidcTestProvider) -> None:
    uid, token = await fresh_user(db, idp)
    before = idp.stats()
    async with running_broker(broker_env(db, idp)) as b:
        r = await report(b, uid, "a-token-that-was-replaced-long-ago")
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, token)
    assert delta(before, idp.stats())["token_requests"] == 0


async def test_a_rejection_of_the_token_just_produced_does_not_loop(db: Database, idp: OidcTestProvider) -> None:
    uid, token = await fresh_user(db, idp)
    async with running_broker(broker_env(db, idp)) as b:
        first = await report(b, uid, token)
        before = idp.stats()
        again = await report(b, uid, first.access_token)  # the upstream refuses the new token too
        assert b.sample("token_broker_forced_refreshes_total", result="loop_guard") == 1
    assert first.status == pb.TOKEN_STATUS_REFRESHED
    assert (again.status, again.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert delta(before, idp.stats())["token_requests"] == 0


async def test_after_the_interval_the_new_token_may_be_reported_again(db: Database, idp: OidcTestProvider) -> None:
    uid, token = await fresh_user(db, idp)
    async with running_broker(broker_env(db, idp, BROKER_FORCED_REFRESH_INTERVAL="0.5")) as b:
        first = await report(b, uid, token)
        await asyncio.sleep(0.6)
        second = await report(b, uid, first.access_token)
    assert second.status == pb.TOKEN_STATUS_REFRESHED
    assert second.access_token not in ("", token, first.access_token)


@pytest.mark.parametrize("with_idp", [True, False], ids=["no-refresh-token", "no-idp"])
async def test_a_report_that_cannot_be_refreshed_is_reauth_required(
    db: Database, idp: OidcTestProvider, with_idp: bool
) -> None:
    uid = uuid.uuid4()
    refresh = "" if with_idp else "r"
    await db.insert_link(uid, "upstream-refused-this", refresh, datetime.now(UTC) + timedelta(hours=1))
    async with running_broker(broker_env(db, idp if with_idp else None)) as b:
        r = await report(b, uid, "upstream-refused-this")
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")


@pytest.mark.parametrize("fingerprint", ["abc", "g" * 64, sha("x")[:63], sha("x") + "0", "Zm9v" * 16])
async def test_a_malformed_fingerprint_is_invalid_argument(db: Database, fingerprint: str) -> None:
    async with running_broker(broker_env(db)) as b:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await b.stub.GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(uuid.uuid4()), rejected_token_sha256=fingerprint), timeout=5
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rejected_token_sha256" in (err.value.details() or "")


async def test_the_audit_line_records_the_report(
    db: Database, idp: OidcTestProvider, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    uid, token = await fresh_user(db, idp)
    with caplog.at_level(logging.INFO, logger="broker.audit"):
        async with running_broker(broker_env(db, idp)) as b:
            await b.get(uid)
            await report(b, uid, token)
    audits = [r for r in caplog.records if r.name == "broker.audit"]
    assert [getattr(r, "rejected_token_reported", None) for r in audits] == [False, True]
    assert token not in caplog.text
    assert sha(token) not in caplog.text


@dataclass
class Outage:
    """Two broker processes, and a user whose token the upstream rejected while the IdP was down."""

    here: RunningBroker
    other: BrokerProcess
    uid: uuid.UUID
    token: str
    reported: pb.GetOIDCAccessTokenResponse

    async def elsewhere(self) -> pb.GetOIDCAccessTokenResponse:
        return await call_broker(self.other.target, self.uid, timeout=10)


@asynccontextmanager
async def rejected_during_an_outage(db: Database, idp: OidcTestProvider, tmp_path: Path) -> AsyncIterator[Outage]:
    uid, token = await fresh_user(db, idp)
    other = BrokerProcess(broker_env(db, idp), tmp_path / "other.log")
    try:
        async with running_broker(broker_env(db, idp)) as b:
            await warm_discovery(b)
            idp.set_fault("down")
            yield Outage(b, other, uid, token, await report(b, uid, token))
    finally:
        other.stop()


async def test_after_a_failed_forced_refresh_no_process_serves_the_rejected_token(
    db: Database, idp: OidcTestProvider, tmp_path: Path
) -> None:
    """The IdP is down when the upstream's rejection is reported: that call, later plain calls, and plain calls on
    another broker process answer "" with IDP_UNAVAILABLE (retry later; the user need not log in again). Once the
    IdP is back, the next call refreshes, and every process serves the new token."""
    async with rejected_during_an_outage(db, idp, tmp_path) as o:
        plain = await o.here.get(o.uid)
        elsewhere = await o.elsewhere()
        idp.set_fault("ok")
        after = await o.here.get(o.uid)
        elsewhere_after = await o.elsewhere()
    for r in (o.reported, plain, elsewhere):
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
    assert after.status == pb.TOKEN_STATUS_REFRESHED
    assert after.access_token not in ("", o.token)
    assert idp.active(after.access_token)
    assert (elsewhere_after.status, elsewhere_after.access_token) == (pb.TOKEN_STATUS_VALID, after.access_token)


async def test_a_new_login_replaces_a_rejected_token(db: Database, idp: OidcTestProvider, tmp_path: Path) -> None:
    """While the IdP stays down, a new login writes new tokens to the row: every process serves them at once."""
    relogin = await idp.login(f"user-{uuid.uuid4()}")  # the code exchange needs the token endpoint: before the outage
    async with rejected_during_an_outage(db, idp, tmp_path) as o:
        before = await o.elsewhere()
        await db.execute(
            "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3 WHERE user_id = $1",
            o.uid,
            relogin.access_token,
            relogin.refresh_token,
        )
        here = await o.here.get(o.uid)
        elsewhere = await o.elsewhere()
    for r in (o.reported, before):
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
    for r in (here, elsewhere):
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, relogin.access_token)
