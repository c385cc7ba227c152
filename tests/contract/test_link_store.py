"""The LinkStore contract (broker.core.interfaces), one set of tests run on the in-memory FakeStore of the unit tests
and on PostgresStore over a real PostgreSQL with the product's schema: a unit test on the fake proves what production
does only as far as these tests hold on both.

Each backend seeds and inspects its rows its own way (the fake's dict, SQL as the superuser); the tests talk to the
store only through the interface.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Protocol

import pytest

from broker.core.interfaces import LinkStore, LockedLink
from broker.errors import RefreshLockTimeout, StoreUnavailable
from broker.model import AccountState, DbKey, Link, RefreshedTokens, Secret
from broker.postgres.codec import normalise_expiry
from tests.support.broker import postgres_store
from tests.support.fakes import FakeClock, FakeStore
from tests.support.pg import Database, DatabaseFactory

T = 5.0  # every call's timeout: generous, nothing here is about speed
LATER = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


class Backend(Protocol):
    """A LinkStore under test, with the test's own access to what it stores."""

    store: LinkStore

    async def put(self, user_id: uuid.UUID, access: str, refresh: str, expiry: datetime | None) -> None:
        """A user with an OIDC link (the product's login, or a new login over an existing link)."""

    async def disable(self, user_id: uuid.UUID, how: str) -> None:
        """Suspend ("suspended") or delete ("deleted") the link's user."""

    async def stored(self, user_id: uuid.UUID) -> tuple[str, str, datetime | None] | None:
        """(access, refresh, expiry) as the row holds them now."""

    async def has_marker(self, user_id: uuid.UUID) -> bool: ...

    async def age_marker(self, user_id: uuid.UUID, seconds: float) -> None:
        """Move the marker's last heartbeat `seconds` into the past (a holder that went silent)."""

    async def add_key(self, key: DbKey) -> None: ...


class Fake:
    def __init__(self) -> None:
        self.fake = FakeStore(FakeClock())
        self.store: LinkStore = self.fake

    async def put(self, user_id: uuid.UUID, access: str, refresh: str, expiry: datetime | None) -> None:
        old = self.fake.rows.get(user_id)
        account = AccountState.ACTIVE if old is None else old.account
        self.fake.put(Link(user_id, Secret(access), Secret(refresh), expiry, account))

    async def disable(self, user_id: uuid.UUID, how: str) -> None:
        row = self.fake.rows[user_id]
        self.fake.put(Link(row.user_id, row.access_token, row.refresh_token, row.expiry, AccountState.DISABLED))
        if how == "deleted":
            self.fake.deleted.add(user_id)

    async def stored(self, user_id: uuid.UUID) -> tuple[str, str, datetime | None] | None:
        row = self.fake.rows.get(user_id)
        return None if row is None else (row.access_token.reveal(), row.refresh_token.reveal(), row.expiry)

    async def has_marker(self, user_id: uuid.UUID) -> bool:
        return user_id in self.fake.markers

    async def age_marker(self, user_id: uuid.UUID, seconds: float) -> None:
        self.fake.markers[user_id].heartbeat -= seconds

    async def add_key(self, key: DbKey) -> None:
        self.fake.keys.append(key)


class Postgres:
    def __init__(self, db: Database, store: LinkStore) -> None:
        self.db = db
        self.store = store
        self._keys = 0

    async def put(self, user_id: uuid.UUID, access: str, refresh: str, expiry: datetime | None) -> None:
        await self.db.execute(
            "INSERT INTO users (id, email, username) VALUES ($1, $2, $2) ON CONFLICT DO NOTHING", user_id, str(user_id)
        )
        await self.db.execute(
            "INSERT INTO user_links (user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry)"
            " VALUES ($1, 'oidc', $2, $3, COALESCE($4, '0001-01-01 00:00:00+00'::timestamptz))"
            " ON CONFLICT (user_id, login_type) DO UPDATE SET oauth_access_token = EXCLUDED.oauth_access_token,"
            " oauth_refresh_token = EXCLUDED.oauth_refresh_token, oauth_expiry = EXCLUDED.oauth_expiry",
            user_id,
            access,
            refresh,
            expiry,
        )

    async def disable(self, user_id: uuid.UUID, how: str) -> None:
        sql = {
            "suspended": "UPDATE users SET status = 'suspended' WHERE id = $1",
            "deleted": "UPDATE users SET deleted = true WHERE id = $1",
        }[how]
        await self.db.execute(sql, user_id)

    async def stored(self, user_id: uuid.UUID) -> tuple[str, str, datetime | None] | None:
        row = await self.db.link(user_id)
        if row is None:
            return None
        return row["oauth_access_token"], row["oauth_refresh_token"], normalise_expiry(row["oauth_expiry"])

    async def has_marker(self, user_id: uuid.UUID) -> bool:
        return await self.db.marker(user_id) is not None

    async def age_marker(self, user_id: uuid.UUID, seconds: float) -> None:
        await self.db.execute(
            "UPDATE token_broker.refresh_in_flight SET heartbeat_at = heartbeat_at - make_interval(secs => $2)"
            " WHERE user_id = $1",
            user_id,
            seconds,
        )

    async def add_key(self, key: DbKey) -> None:
        self._keys += 1
        await self.db.execute(
            "INSERT INTO dbcrypt_keys (number, active_key_digest, revoked_key_digest, test) VALUES ($1, $2, $3, $4)",
            self._keys,
            key.active_digest,
            key.revoked_digest,
            key.test,
        )


@pytest.fixture(params=["fake", "postgres"])
async def backend(request: pytest.FixtureRequest, databases: DatabaseFactory) -> AsyncIterator[Backend]:
    if request.param == "fake":
        yield Fake()
        return
    db = await databases.create("product")
    async with postgres_store(db) as store:
        yield Postgres(db, store)


def tokens(n: int, expiry: datetime | None = LATER) -> RefreshedTokens:
    return RefreshedTokens(Secret(f"access-{n}"), Secret(f"refresh-{n}"), expiry)


async def seeded(backend: Backend, n: int = 1, expiry: datetime | None = LATER) -> uuid.UUID:
    uid = uuid.uuid4()
    await backend.put(uid, f"access-{n}", f"refresh-{n}", expiry)
    return uid


def lock(backend: Backend, uid: uuid.UUID, lock_timeout: float = T) -> AbstractAsyncContextManager[LockedLink]:
    return backend.store.lock_link(uid, lock_timeout=lock_timeout, hold_timeout=T)


async def under_lock(backend: Backend, uid: uuid.UUID) -> Link:
    """The link as the next holder of the lock reads it (with the marker's and the forced refresh's ages)."""
    async with lock(backend, uid) as locked:
        assert locked.link is not None
        return locked.link


async def marked(backend: Backend, uid: uuid.UUID) -> None:
    """A holder marks the link's refresh token as sent to the IdP and leaves the lock (its call is still out)."""
    async with lock(backend, uid) as locked:
        await locked.mark_in_flight()


def seconds(age: float | None) -> float:
    assert age is not None
    return age


class Abort(Exception):
    """Raised inside a lock's block: the locked transaction rolls back."""


async def in_a_failing_block(backend: Backend, uid: uuid.UUID, body: Callable[[LockedLink], Awaitable[object]]) -> None:
    """Run `body` under the lock, then fail the block (the locked transaction rolls back)."""

    async def run() -> None:
        async with lock(backend, uid) as locked:
            await body(locked)
            raise Abort

    with pytest.raises(Abort):
        await run()


# -- reads --------------------------------------------------------------------------------------------------------


async def test_a_link_reads_as_stored(backend: Backend) -> None:
    uid = await seeded(backend)
    link = await backend.store.get_link(uid, timeout=T)
    assert link == Link(uid, Secret("access-1"), Secret("refresh-1"), LATER)


async def test_no_link_reads_as_none(backend: Backend) -> None:
    assert await backend.store.get_link(uuid.uuid4(), timeout=T) is None


async def test_the_products_zero_time_reads_as_never_expiring(backend: Backend) -> None:
    uid = await seeded(backend, expiry=None)
    link = await backend.store.get_link(uid, timeout=T)
    assert link is not None
    assert link.expiry is None


@pytest.mark.parametrize("how", ["suspended", "deleted"])
async def test_a_disabled_accounts_link_reads_as_disabled(backend: Backend, how: str) -> None:
    uid = await seeded(backend)
    await backend.disable(uid, how)
    link = await backend.store.get_link(uid, timeout=T)
    assert link is not None
    assert link.account is AccountState.DISABLED
    assert (await under_lock(backend, uid)).account is AccountState.DISABLED


async def test_a_plain_read_reports_no_marker_and_no_forced_refresh(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid) as locked:
        await locked.mark_in_flight()
        await locked.note_forced()
    link = await backend.store.get_link(uid, timeout=T)
    assert link is not None
    assert (link.marker_idle_seconds, link.forced_seconds_ago) == (None, None)  # only read under the lock


async def test_a_new_login_is_what_the_next_read_sees(backend: Backend) -> None:
    uid = await seeded(backend)
    await backend.store.get_link(uid, timeout=T)
    await backend.put(uid, "access-9", "refresh-9", None)
    assert await backend.store.get_link(uid, timeout=T) == Link(uid, Secret("access-9"), Secret("refresh-9"), None)


# -- the lock -----------------------------------------------------------------------------------------------------


async def test_the_lock_reads_the_link_with_no_marker_and_no_forced_refresh(backend: Backend) -> None:
    uid = await seeded(backend)
    assert await under_lock(backend, uid) == Link(uid, Secret("access-1"), Secret("refresh-1"), LATER)


async def test_the_lock_on_no_link_reads_none(backend: Backend) -> None:
    async with lock(backend, uuid.uuid4()) as locked:
        assert locked.link is None


async def test_a_second_holder_waits_for_the_first(backend: Backend) -> None:
    uid = await seeded(backend)
    order: list[str] = []
    entered = asyncio.Event()

    async def second() -> None:
        await entered.wait()
        async with lock(backend, uid) as locked:
            order.append("second holds")
            assert locked.link is not None
            assert locked.link.access_token == Secret("access-2")  # the first holder's commit, re-read

    waiting = asyncio.create_task(second())
    async with lock(backend, uid) as locked:
        entered.set()
        await asyncio.sleep(0.2)  # room for the second to take the lock, were it not held
        await locked.save(tokens(2))
        order.append("first commits")
    await waiting
    assert order == ["first commits", "second holds"]


async def test_a_held_lock_times_out_the_next_holder(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid):
        with pytest.raises(RefreshLockTimeout):
            async with lock(backend, uid, lock_timeout=0.2):
                pass
    assert await under_lock(backend, uid)  # released: the next holder gets it


async def test_the_lock_of_one_link_does_not_hold_another(backend: Backend) -> None:
    first, other = await seeded(backend), await seeded(backend, 2)
    async with lock(backend, first), lock(backend, other, lock_timeout=0.5) as locked:
        assert locked.link is not None
        assert locked.link.user_id == other


# -- writes under the lock ----------------------------------------------------------------------------------------


async def test_a_save_under_the_lock_is_committed_when_the_block_ends(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid) as locked:
        assert await locked.save(tokens(2, expiry=None)) is True
    assert await backend.stored(uid) == ("access-2", "refresh-2", None)
    assert await backend.store.get_link(uid, timeout=T) == Link(uid, Secret("access-2"), Secret("refresh-2"), None)


async def test_a_save_under_the_lock_is_rolled_back_when_the_block_fails(backend: Backend) -> None:
    uid = await seeded(backend)
    saved: list[bool] = []

    async def save(locked: LockedLink) -> None:
        saved.append(await locked.save(tokens(2)))

    await in_a_failing_block(backend, uid, save)
    assert saved == [True]
    assert await backend.stored(uid) == ("access-1", "refresh-1", LATER)


async def test_a_forced_refresh_is_noted_with_the_commit(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid) as locked:
        assert locked.link is not None
        assert locked.link.forced_seconds_ago is None
        await locked.note_forced()
    assert 0 <= seconds((await under_lock(backend, uid)).forced_seconds_ago) < 60


async def test_a_forced_refresh_note_is_rolled_back_with_the_block(backend: Backend) -> None:
    uid = await seeded(backend)
    await in_a_failing_block(backend, uid, lambda locked: locked.note_forced())
    assert (await under_lock(backend, uid)).forced_seconds_ago is None


# -- the in-flight marker -----------------------------------------------------------------------------------------


async def test_a_marker_is_committed_at_once_and_seen_by_the_next_holder(backend: Backend) -> None:
    uid = await seeded(backend)
    await in_a_failing_block(backend, uid, lambda locked: locked.mark_in_flight())  # the marker stays
    assert await backend.has_marker(uid)
    assert 0 <= seconds((await under_lock(backend, uid)).marker_idle_seconds) < 60


async def test_a_marker_counts_only_for_the_refresh_token_it_was_taken_for(backend: Backend) -> None:
    uid = await seeded(backend)
    await marked(backend, uid)
    await backend.put(uid, "access-9", "refresh-9", LATER)  # a new login replaced the token
    assert (await under_lock(backend, uid)).marker_idle_seconds is None


async def test_abandoning_lifts_the_marker(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid) as locked:
        await locked.mark_in_flight()
        await locked.clear_in_flight()
    assert not await backend.has_marker(uid)
    assert (await under_lock(backend, uid)).marker_idle_seconds is None


async def test_abandoning_never_lifts_another_tokens_marker(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid) as stale:
        await stale.mark_in_flight()
    await backend.put(uid, "access-9", "refresh-9", LATER)
    await marked(backend, uid)
    await stale.clear_in_flight()  # the holder of the replaced token gives up late
    assert (await under_lock(backend, uid)).marker_idle_seconds is not None


async def test_a_heartbeat_renews_the_holders_marker_only(backend: Backend) -> None:
    uid, other = await seeded(backend), await seeded(backend, 2)
    for user in (uid, other):
        await marked(backend, user)
        await backend.age_marker(user, 100)
    await backend.store.heartbeat([(uid, Secret("refresh-1")), (other, Secret("not-the-token"))], timeout=T)
    assert seconds((await under_lock(backend, uid)).marker_idle_seconds) < 100
    assert seconds((await under_lock(backend, other)).marker_idle_seconds) >= 100


async def test_a_heartbeat_of_nothing_is_fine(backend: Backend) -> None:
    await backend.store.heartbeat([], timeout=T)


async def test_a_dead_holders_marker_is_taken_over(backend: Backend) -> None:
    uid = await seeded(backend)
    await marked(backend, uid)
    await backend.age_marker(uid, 100)
    async with lock(backend, uid) as locked:
        assert locked.link is not None
        assert seconds(locked.link.marker_idle_seconds) >= 100
        await locked.mark_in_flight()
    assert seconds((await under_lock(backend, uid)).marker_idle_seconds) < 100


async def test_a_save_under_the_lock_lifts_the_marker_of_the_token_sent(backend: Backend) -> None:
    uid = await seeded(backend)
    async with lock(backend, uid) as locked:
        await locked.mark_in_flight()
        assert await locked.save(tokens(2)) is True
    assert not await backend.has_marker(uid)


async def test_a_rolled_back_save_leaves_the_marker(backend: Backend) -> None:
    uid = await seeded(backend)

    async def mark_and_save(locked: LockedLink) -> None:
        await locked.mark_in_flight()
        await locked.save(tokens(2))

    await in_a_failing_block(backend, uid, mark_and_save)
    assert await backend.has_marker(uid)


# -- the write-back outside the lock (compare-and-set) ------------------------------------------------------------


async def read(backend: Backend, uid: uuid.UUID) -> Link:
    link = await backend.store.get_link(uid, timeout=T)
    assert link is not None
    return link


async def test_the_write_back_wins_over_the_token_it_was_sent_with(backend: Backend) -> None:
    uid = await seeded(backend)
    previous = await read(backend, uid)
    await marked(backend, uid)
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is True
    assert await backend.stored(uid) == ("access-2", "refresh-2", LATER)
    assert not await backend.has_marker(uid)


async def test_the_write_back_loses_when_the_refresh_token_changed(backend: Backend) -> None:
    uid = await seeded(backend)
    previous = await read(backend, uid)
    await backend.put(uid, "access-9", "refresh-9", LATER)  # a new login
    await marked(backend, uid)  # the new token's holder, live
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is False
    assert await backend.stored(uid) == ("access-9", "refresh-9", LATER)
    assert await backend.has_marker(uid)  # a stale write-back never lifts another holder's marker


async def test_the_write_back_retried_after_it_landed_still_wins(backend: Backend) -> None:
    uid = await seeded(backend)
    previous = await read(backend, uid)
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is True
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is True  # its answer was lost
    assert await backend.stored(uid) == ("access-2", "refresh-2", LATER)


async def test_the_write_back_of_an_older_refresh_loses_after_a_newer_one(backend: Backend) -> None:
    uid = await seeded(backend)
    previous = await read(backend, uid)
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is True
    rotated = await read(backend, uid)
    assert await backend.store.save_refreshed(rotated, tokens(3), timeout=T) is True
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is False
    assert await backend.stored(uid) == ("access-3", "refresh-3", LATER)


async def test_the_write_back_for_no_link_loses(backend: Backend) -> None:
    ghost = Link(uuid.uuid4(), Secret("access-1"), Secret("refresh-1"), LATER)
    assert await backend.store.save_refreshed(ghost, tokens(2), timeout=T) is False


async def test_the_write_back_to_a_suspended_users_link_lands(backend: Backend) -> None:
    uid = await seeded(backend)
    previous = await read(backend, uid)
    await backend.disable(uid, "suspended")
    assert await backend.store.save_refreshed(previous, tokens(2), timeout=T) is True
    assert await backend.stored(uid) == ("access-2", "refresh-2", LATER)


async def test_the_write_back_to_a_deleted_users_link_fails(backend: Backend) -> None:
    """The product's trigger refuses every write to a deleted user's link (only a write that would land)."""
    uid = await seeded(backend)
    previous = await read(backend, uid)
    await backend.disable(uid, "deleted")
    with pytest.raises(StoreUnavailable):
        await backend.store.save_refreshed(previous, tokens(2), timeout=T)
    stale = Link(uid, Secret("access-0"), Secret("refresh-0"), LATER)
    assert await backend.store.save_refreshed(stale, tokens(2), timeout=T) is False
    assert await backend.stored(uid) == ("access-1", "refresh-1", LATER)


async def test_the_write_back_stores_no_expiry_as_never_expiring(backend: Backend) -> None:
    uid = await seeded(backend)
    assert await backend.store.save_refreshed(await read(backend, uid), tokens(2, expiry=None), timeout=T) is True
    assert (await read(backend, uid)).expiry is None


# -- the rest of the interface ------------------------------------------------------------------------------------


async def test_no_dbcrypt_keys_read_as_none(backend: Backend) -> None:
    assert await backend.store.dbcrypt_keys(timeout=T) == []


async def test_dbcrypt_keys_read_in_their_order(backend: Backend) -> None:
    keys = [DbKey(None, "abc1234", "old-test"), DbKey("def5678", None, "new-test")]
    for key in keys:
        await backend.add_key(key)
    assert await backend.store.dbcrypt_keys(timeout=T) == keys


async def test_a_working_store_answers_ping(backend: Backend) -> None:
    assert await backend.store.ping(timeout=T) is True
