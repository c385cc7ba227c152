"""The core contract through the real gRPC API: real PostgreSQL, real oidc-provider, generated stubs."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from broker.postgres.embedded import free_port
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import broker_env, running_broker, warm_discovery
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database


def now() -> datetime:
    return datetime.now(UTC)


async def test_fresh_token_is_served_without_calling_the_idp(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    expiry = now() + timedelta(hours=2)
    await db.insert_link(uid, "access-fresh", "refresh-fresh", expiry)
    before = idp.stats()["token_requests"]
    async with running_broker(broker_env(db, idp)) as b:
        r = await b.get(uid)
    assert r.status == pb.TOKEN_STATUS_VALID
    assert r.access_token == "access-fresh"
    assert abs(r.expires_at.ToDatetime(tzinfo=UTC) - expiry) < timedelta(milliseconds=1)
    assert idp.stats()["token_requests"] == before


async def test_zero_expiry_means_never_expires(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "access-forever", "refresh-x", None)
    async with running_broker(broker_env(db, idp)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token, r.HasField("expires_at")) == (pb.TOKEN_STATUS_VALID, "access-forever", False)


@pytest.mark.parametrize("login_type", [None, "password", "github"])
async def test_no_oidc_link_returns_empty_with_no_link(db: Database, login_type: str | None) -> None:
    uid = uuid.uuid4()
    if login_type:
        await db.insert_link(uid, "pw-token", "", None, login_type=login_type)
    async with running_broker(broker_env(db)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token, r.HasField("expires_at")) == (pb.TOKEN_STATUS_NO_LINK, "", False)


async def test_expired_token_is_refreshed_rotated_and_persisted(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, now() - timedelta(minutes=5))
    before = idp.stats()["refresh_success"]
    async with running_broker(broker_env(db, idp)) as b:
        r = await b.get(uid)
        again = await b.get(uid)
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    assert r.access_token
    assert r.access_token != issued.access_token
    assert idp.stats()["refresh_success"] == before + 1
    row = await db.link(uid)
    assert row is not None
    assert row["oauth_access_token"] == r.access_token
    assert row["oauth_refresh_token"] not in ("", issued.refresh_token)  # rotated token persisted
    assert abs(row["oauth_expiry"] - (now() + timedelta(seconds=issued.expires_in))) < timedelta(seconds=30)
    assert r.expires_at.ToDatetime(tzinfo=UTC) == row["oauth_expiry"].replace(
        microsecond=row["oauth_expiry"].microsecond
    )
    assert (again.status, again.access_token) == (pb.TOKEN_STATUS_VALID, r.access_token)
    # The IdP now rejects the old refresh token (and, with reuse detection, revokes the grant).
    resp = idp.refresh_directly(issued.refresh_token)
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("expires_in", "leeway", "refreshed"),
    [
        (timedelta(minutes=5), 600, True),  # inside the leeway window, not yet expired
        (timedelta(seconds=600), 600, True),  # exactly at the boundary (now >= expiry - leeway)
        (timedelta(minutes=30), 600, False),  # outside the window
    ],
)
async def test_refresh_window(
    db: Database, idp: OidcTestProvider, expires_in: timedelta, leeway: int, refreshed: bool
) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    await db.insert_link(uid, issued.access_token, issued.refresh_token, now() + expires_in)
    async with running_broker(broker_env(db, idp, BROKER_REFRESH_LEEWAY=str(leeway), BROKER_REFRESH_AHEAD="0")) as b:
        r = await b.get(uid)
    if refreshed:
        assert r.status == pb.TOKEN_STATUS_REFRESHED
        assert r.access_token != issued.access_token
    else:
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, issued.access_token)


async def test_without_idp_valid_tokens_are_served_and_expired_ones_are_expired(db: Database) -> None:
    fresh, expired, soon = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await db.insert_link(fresh, "a-fresh", "r", now() + timedelta(hours=1))
    await db.insert_link(expired, "a-old", "r", now() - timedelta(seconds=1))
    await db.insert_link(soon, "a-soon", "r", now() + timedelta(minutes=2))  # in the window, not expired
    async with running_broker(broker_env(db)) as b:
        r_fresh, r_expired, r_soon = await b.get(fresh), await b.get(expired), await b.get(soon)
    assert (r_fresh.status, r_fresh.access_token) == (pb.TOKEN_STATUS_VALID, "a-fresh")
    assert (r_expired.status, r_expired.access_token) == (pb.TOKEN_STATUS_EXPIRED, "")
    assert (r_soon.status, r_soon.access_token) == (pb.TOKEN_STATUS_VALID, "a-soon")


async def test_expired_without_refresh_token_is_expired(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a-old", "", now() - timedelta(hours=1))
    before = idp.stats()["token_requests"]
    async with running_broker(broker_env(db, idp)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_EXPIRED, "")
    assert idp.stats()["token_requests"] == before


async def test_wrong_client_secret_is_reauth_required_and_row_untouched(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    expiry = now() - timedelta(minutes=1)
    await db.insert_link(uid, issued.access_token, issued.refresh_token, expiry)
    before = await db.link(uid)
    async with running_broker(broker_env(db, idp, BROKER_OIDC_CLIENT_SECRET="not-the-secret")) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert await db.link(uid) == before


async def test_revoked_grant_is_reauth_required_and_row_untouched(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    # Someone else uses the refresh token first: rotation makes the stored one dead.
    idp.refresh_directly(issued.refresh_token).raise_for_status()
    await db.insert_link(uid, issued.access_token, issued.refresh_token, now() - timedelta(minutes=1))
    before = await db.link(uid)
    async with running_broker(broker_env(db, idp)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REAUTH_REQUIRED, "")
    assert await db.link(uid) == before


async def test_refresh_failure_before_expiry_returns_stored_token_as_valid(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "still-good", "dead-refresh-token", now() + timedelta(minutes=3))
    async with running_broker(broker_env(db, idp)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "still-good")


async def test_unreachable_idp_is_idp_unavailable_within_the_timeout(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a-old", "r-old", now() - timedelta(minutes=1))
    env = broker_env(
        db,
        None,
        BROKER_OIDC_TOKEN_URL=f"http://127.0.0.1:{free_port()}/token",
        BROKER_OIDC_CLIENT_ID="c",
        BROKER_OIDC_CLIENT_SECRET="s",
        BROKER_OIDC_TIMEOUT="1",
    )
    async with running_broker(env) as b:
        started = time.monotonic()
        r = await b.get(uid)
        elapsed = time.monotonic() - started
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
    assert elapsed < 2.0


async def test_hanging_idp_is_idp_unavailable_within_the_timeout(db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a-old", "r-old", now() - timedelta(minutes=1))
    async with running_broker(broker_env(db, idp, BROKER_OIDC_TIMEOUT="0.5")) as b:
        await warm_discovery(b)  # discovery before the fault
        idp.set_fault("ok", delay_ms=3000)
        started = time.monotonic()
        r = await b.get(uid)
        elapsed = time.monotonic() - started
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")
    assert elapsed < 1.5


@pytest.mark.parametrize("mode", ["down", "garbage"])
async def test_idp_5xx_or_garbage_is_idp_unavailable(db: Database, idp: OidcTestProvider, mode: str) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a-old", "r-old", now() - timedelta(minutes=1))
    async with running_broker(broker_env(db, idp)) as b:
        idp.set_fault(mode)
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_IDP_UNAVAILABLE, "")


async def test_database_down_is_store_unavailable(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a", "r", now() + timedelta(hours=1))
    async with running_broker(broker_env(db, BROKER_REQUEST_TIMEOUT="2")) as b:
        assert (await b.get(uid)).status == pb.TOKEN_STATUS_VALID
        await db.set_reachable(False)
        started = time.monotonic()
        r = await b.get(uid)
        assert time.monotonic() - started < 3
        assert (r.status, r.access_token) == (pb.TOKEN_STATUS_STORE_UNAVAILABLE, "")
        await db.set_reachable(True)
        assert (await b.get(uid)).status == pb.TOKEN_STATUS_VALID


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-a-uuid",
        "1234",
        "{11111111-1111-1111-1111-111111111111}",
        "11111111111111111111111111111111",
        "11111111-1111-1111-1111-11111111111g",
        "x" * 1000,
        "11111111-1111-1111-1111-111111111111\n",
    ],
)
async def test_malformed_user_id_is_invalid_argument(db: Database, bad: str) -> None:
    async with running_broker(broker_env(db)) as b:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await b.get(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UUID" in (err.value.details() or "")


async def test_uppercase_uuid_is_accepted(db: Database) -> None:
    uid = uuid.uuid4()
    await db.insert_link(uid, "a", "r", None)
    async with running_broker(broker_env(db)) as b:
        r = await b.get(str(uid).upper())
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_VALID, "a")


async def test_oversized_request_is_rejected_before_parsing(db: Database) -> None:
    async with running_broker(broker_env(db)) as b:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await b.get("x" * 5000)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
