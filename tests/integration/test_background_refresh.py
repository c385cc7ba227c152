"""Background refresh of active users and foreign rotations, against real PostgreSQL, oidc-provider (rotation and
reuse detection on) and the product's refreshers' stand-in (tests/support/product.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.core.interfaces import LinkStore, LockedLink
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import RunningBroker, broker_env, postgres_store, running_broker, warm_discovery
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database
from tests.support.product import ProductRefreshers
from tests.support.stores import DelegatingStore

#: A tick of 0.05 s (a 60th of a 3-second window), no jitter, a 0.5 s IdP timeout: due 3.6 s before expiry.
FAST = {
    "BROKER_PRODUCT_REFRESH_WINDOW": "3",
    "BROKER_BACKGROUND_JITTER": "0",
    "BROKER_REFRESH_AHEAD": "0",
    "BROKER_OIDC_TIMEOUT": "0.5",
}


async def until(check: Callable[[], Awaitable[Any]], seconds: float = 10.0) -> Any:
    """Poll `check` until it returns something truthy, within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def schedule_row(db: Database, uid: uuid.UUID) -> Any:
    return await db.fetchrow("SELECT * FROM token_broker.refresh_schedule WHERE user_id = $1", uid)


async def logged_in(db: Database, idp: OidcTestProvider, *, expires_in: float | None = None) -> tuple[uuid.UUID, str]:
    """A product user who logged in with OIDC; the stored expiry is `expires_in` from now (else the IdP's)."""
    uid = uuid.uuid4()
    issued = await idp.login(f"user-{uid}")
    has_users = await db.fetchrow("SELECT to_regclass('public.users') IS NOT NULL AS yes")
    if has_users is not None and has_users["yes"]:  # the product's schema: the user's row first
        await db.execute("INSERT INTO users (id, email, username) VALUES ($1, $2, 'u')", uid, f"{uid}@x")
    seconds = issued.expires_in if expires_in is None else expires_in
    await db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(seconds=seconds))
    return uid, issued.refresh_token


@asynccontextmanager
async def product(db: Database, idp: OidcTestProvider) -> AsyncIterator[ProductRefreshers]:
    """The product's refreshers, with a build window so wide that every build refreshes."""
    p = await ProductRefreshers.open(db.admin_url, idp.token_url, timedelta(days=1))
    try:
        yield p
    finally:
        await p.close()


def foreign(b: RunningBroker) -> float:
    return b.sample("token_broker_foreign_rotations_total")


async def test_a_product_rotation_is_counted_once_and_logged_once_per_window(
    product_db: Database, idp: OidcTestProvider, caplog: pytest.LogCaptureFixture
) -> None:
    uid, _ = await logged_in(product_db, idp)
    async with running_broker(broker_env(product_db, idp, **FAST)) as b, product(product_db, idp) as p:
        await b.get(uid)
        assert await until(lambda: schedule_row(product_db, uid))
        with caplog.at_level(logging.INFO, logger="broker.refresh"):
            await p.build(uid)  # the product rotates the token with its plain UPDATE
            for _ in range(3):  # several requests, one rotation
                assert (await b.get(uid)).status == pb.TOKEN_STATUS_VALID
            assert await until(lambda: asyncio.sleep(0, foreign(b) == 1))
            await p.build(uid)  # a second rotation within the window: counted, not logged again
            await b.get(uid)
            assert await until(lambda: asyncio.sleep(0, foreign(b) == 2))
        lines = [r for r in caplog.records if "rotated by someone other than a broker" in r.getMessage()]
        assert len(lines) == 1
        assert foreign(b) == 2
    row = await schedule_row(product_db, uid)
    link = await product_db.link(uid)
    assert row is not None
    assert link is not None
    # The schedule knows the product's token by its SHA-256 only.
    assert row["refresh_sha256"] == hashlib.sha256(link["oauth_refresh_token"].encode()).digest()


async def test_a_brokers_own_rotation_is_not_foreign_on_any_replica(db: Database, idp: OidcTestProvider) -> None:
    uid, _ = await logged_in(db, idp)
    env = broker_env(db, idp, **FAST)
    async with running_broker(env) as b1, running_broker(env) as b2:
        await b1.get(uid)
        await b2.get(uid)
        assert await until(lambda: schedule_row(db, uid))
        await db.expire(uid)
        refreshed = await b1.get(uid)
        assert refreshed.status == pb.TOKEN_STATUS_REFRESHED
        for _ in range(3):
            assert (await b2.get(uid)).access_token == refreshed.access_token
        # The schedule holds the new token's hash (written by b1 under the lock); neither replica counted it.
        link = await db.link(uid)
        assert link is not None
        assert await until(lambda: _noted(db, uid, hashlib.sha256(link["oauth_refresh_token"].encode()).digest()))
        await asyncio.sleep(0.3)  # several ticks of both replicas: a count would have landed by now
        assert foreign(b1) == foreign(b2) == 0


async def _noted(db: Database, uid: uuid.UUID, sha: bytes) -> bool:
    row = await schedule_row(db, uid)
    return row is not None and row["refresh_sha256"] == sha


async def test_an_active_user_is_refreshed_before_the_window_and_an_idle_one_is_left_alone(
    db: Database, idp: OidcTestProvider
) -> None:
    """Window 3 s, ticks of 0.05 s, request-path leeway 1 s: an active user's token that expires in 5 s is
    refreshed by the background (at about 3.6 s before expiry, while requests would not refresh it yet); an idle
    user's (asked once, more than the active window before its refresh would fall due) is not touched."""
    active, active_rt = await logged_in(db, idp, expires_in=5)
    idle, idle_rt = await logged_in(db, idp, expires_in=8)
    before = idp.stats()
    env = broker_env(db, idp, BROKER_ACTIVE_WINDOW="1", BROKER_REFRESH_LEEWAY="1", **FAST)
    async with running_broker(env) as b:
        assert (await b.get(idle)).status == pb.TOKEN_STATUS_VALID

        async def rotated() -> bool:
            assert (await b.get(active)).status == pb.TOKEN_STATUS_VALID  # asked, never inside the 1 s leeway
            link = await db.link(active)
            assert link is not None
            return bool(link["oauth_refresh_token"] != active_rt)

        assert await until(rotated, seconds=8)
        assert b.sample("token_broker_refreshes_total", result="success") == 1
        assert await until(lambda: _unscheduled(db, idle), seconds=10)
    idle_link = await db.link(idle)
    assert idle_link is not None
    assert idle_link["oauth_refresh_token"] == idle_rt
    d = idp.stats()
    assert d["refresh_success"] - before["refresh_success"] == 1
    assert d["grants_revoked"] == before["grants_revoked"]


async def _unscheduled(db: Database, uid: uuid.UUID) -> Any:
    row = await schedule_row(db, uid)
    return row if row is not None and row["due_at"] is None else None


async def test_short_tokens_are_never_refreshed_before_half_their_lifetime(db: Database) -> None:
    """4-second tokens under a 3-second window: the half-lifetime rule wins (due at expiry - lifetime / 2), so an
    active user's token is refreshed about once per 2 s however often it is asked for, never on every request."""
    idp = OidcTestProvider(access_ttl=4)
    try:
        uid, _ = await logged_in(db, idp)
        async with running_broker(broker_env(db, idp, BROKER_REFRESH_LEEWAY="2", **FAST)) as b:
            started = time.monotonic()
            for _ in range(80):
                assert (await b.get(uid)).access_token
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            refreshes = b.sample("token_broker_refreshes_total", result="success")
        row = await schedule_row(db, uid)
        link = await db.link(uid)
    finally:
        idp.close()
    assert row is not None
    assert link is not None
    assert row["lifetime_seconds"] == pytest.approx(4, abs=1)
    assert row["due_at"] is not None
    half = row["lifetime_seconds"] / 2
    assert (link["oauth_expiry"] - row["due_at"]).total_seconds() == pytest.approx(half, abs=0.01)
    # One refresh per half-lifetime, plus the first (the lifetime not known yet) and one in flight at the end.
    assert 1 <= refreshes <= elapsed / 2 + 2
    assert refreshes < 80 / 4


async def test_a_product_rotation_under_the_broker_is_used_and_the_held_token_never_sent(
    product_db: Database, idp: OidcTestProvider
) -> None:
    """The broker read an expired row; before it takes the lock, the product refreshes it (plain UPDATE). Under the
    lock the broker finds the product's write and serves it: its own (now consumed) refresh token is never sent."""
    uid, _ = await logged_in(product_db, idp, expires_in=-60)
    gate = asyncio.Event()
    async with postgres_store(product_db) as store, product(product_db, idp) as p:
        held = LockWaitsFor(store, gate)
        async with running_broker(broker_env(product_db, idp), store=held) as b:
            before = idp.stats()
            call = asyncio.ensure_future(b.get(uid))
            await until(lambda: asyncio.sleep(0, held.waiting))
            await p.validate_api_key(uid)  # the product's expired-token path rotates the row
            gate.set()
            r = await call
        link = await product_db.link(uid)
    after = idp.stats()
    assert link is not None
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_REFRESHED, link["oauth_access_token"])
    assert after["token_requests"] - before["token_requests"] == 1  # the product's, and no other
    assert after["grants_revoked"] == before["grants_revoked"]
    assert after["invalid_grant"] == before["invalid_grant"]


class LockWaitsFor(DelegatingStore):
    """A LinkStore over the real one whose refresh lock is taken only once `gate` is set."""

    def __init__(self, inner: LinkStore, gate: asyncio.Event) -> None:
        super().__init__(inner)
        self.gate, self.waiting = gate, False

    @asynccontextmanager
    async def lock_link(
        self, user_id: uuid.UUID, *, lock_timeout: float, hold_timeout: float
    ) -> AsyncIterator[LockedLink]:
        self.waiting = True
        await self.gate.wait()
        async with super().lock_link(user_id, lock_timeout=lock_timeout, hold_timeout=hold_timeout) as locked:
            yield locked


async def test_a_due_refresh_is_claimed_by_one_replica_only(db: Database, idp: OidcTestProvider) -> None:
    """Three replicas serve the user; its background refresh is done by one: one locked refresh in all, not one
    per replica that then finds the row changed (the lock and the marker would prevent a second send anyway). The
    IdP takes 0.5 s, ten ticks of every replica, while the refresh is under way."""
    uid, rt = await logged_in(db, idp, expires_in=5)
    env = broker_env(db, idp, BROKER_REFRESH_LEEWAY="1", **{**FAST, "BROKER_OIDC_TIMEOUT": "2"})
    async with running_broker(env) as b1, running_broker(env) as b2, running_broker(env) as b3:
        replicas = (b1, b2, b3)
        for b in replicas:
            await warm_discovery(b)
        idp.set_fault("ok", delay_ms=500)
        for b in replicas:
            await b.get(uid)

        async def rotated() -> bool:
            link = await db.link(uid)
            return link is not None and link["oauth_refresh_token"] != rt

        assert await until(rotated, seconds=8)
        await asyncio.sleep(0.3)  # several ticks of every replica
        locked = sum(b.sample("token_broker_refresh_lock_wait_seconds_count") for b in replicas)
        sent = sum(b.sample("token_broker_refreshes_total", result="success") for b in replicas)
    assert (locked, sent) == (1, 1)
