"""The background refresh's parts on fakes: what a request notes, the schedule's arithmetic, the note of a written
token in the locked transaction, a tick over a fake schedule, and the settings."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

import pytest

from broker.config import Settings
from broker.core.circuit import CircuitBreaker
from broker.core.interfaces import NullObserver
from broker.core.refresh import Refresher
from broker.core.refresh.background import Activity, BackgroundRefresh
from broker.core.refresh.guarded import GuardedIdentityProvider
from broker.core.refresh.liveness import Liveness
from broker.core.refresh.parts import RefreshParts
from broker.core.refresh.rejections import RejectedTokens
from broker.core.refresh.schedule import BackgroundSettings, Note
from broker.core.refresh.writeback import Pending, WriteBack
from broker.errors import ConfigError
from broker.model import RefreshedTokens, Secret, TokenStatus
from tests.support.fakes import FakeClock, FakeStore, ScriptedIdp, link, tokens
from tests.unit.test_refresh_core import SETTINGS

BS = BackgroundSettings(product_window=600, active_window=3600, jitter=60, claim_seconds=30, refresh_seconds=5)


def sha(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def test_a_request_is_noted_once_per_token_not_once_per_request() -> None:
    a = Activity(BS)
    user = uuid.uuid4()
    for _ in range(100):
        a.seen(link(user, 0, None))
    assert [x.user_id for x in a.take()] == [user]
    a.seen(link(user, 0, None))
    assert a.take() == []  # the same token within a tenth of the active window: nothing to write
    a.seen(link(user, 1, None))
    assert [x.refresh_token.reveal() for x in a.take()] == ["refresh-1"]  # a new token: noted at once


def test_the_refresh_runs_ahead_of_the_window_by_two_ticks_and_a_stable_per_user_jitter() -> None:
    users = [uuid.uuid4() for _ in range(200)]
    aheads = [BS.ahead(u) for u in users]
    assert BS.interval == 10
    assert all(600 + 20 + 5 <= x <= 600 + 20 + 5 + 60 for x in aheads)
    assert aheads == [BS.ahead(u) for u in users]  # the same on every replica
    assert max(aheads) - min(aheads) > 50  # spread over the jitter


async def test_a_written_token_is_noted_in_the_locked_transaction_with_its_lifetime() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    store.put(link(user, 0, clock.now() - timedelta(seconds=1)))
    refresher = _refresher(store, clock, ScriptedIdp(tokens(1, clock, lifetime=1800)), background=BS)
    r = await refresher.refresh(store.rows[user], 1e12)
    assert r.status is TokenStatus.REFRESHED
    [note] = store.written
    assert (note.user_id, note.refresh_sha256) == (user, sha("refresh-1"))
    assert note.lifetime_seconds == 1800
    assert note.ahead_seconds == BS.ahead(user)


async def test_without_background_settings_nothing_is_noted() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    store.put(link(user, 0, clock.now() - timedelta(seconds=1)))
    refresher = _refresher(store, clock, ScriptedIdp(tokens(1, clock)), background=None)
    await refresher.refresh(store.rows[user], 1e12)
    assert store.written == []


async def test_a_write_back_that_lands_later_reports_its_tokens() -> None:
    """So that its refresh token is recorded as a broker's, not counted as a foreign rotation."""
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    store.put(link(user, 0, clock.now() - timedelta(seconds=1)))
    landed: list[tuple[UUID, str]] = []

    async def on_landed(uid: UUID, t: RefreshedTokens) -> None:
        landed.append((uid, t.refresh_token.reveal()))

    liveness = Liveness(store, SETTINGS.heartbeat_interval)
    writeback = WriteBack(
        store, liveness, NullObserver(), store_timeout=1.0, warn_after=30.0, clock=clock.now, on_landed=on_landed
    )
    writeback.hold(user, Pending(store.rows[user], tokens(1, clock)))
    assert await writeback.land_now(user)
    assert landed == [(user, "refresh-1")]
    await writeback.drain(1.0)
    await liveness.close()


@dataclass
class FakeSchedule:
    """A ScheduleStore: hands out `due` once, records notes, and reports `foreign` as rotations no broker made."""

    due: list[tuple[UUID, bytes | None]] = field(default_factory=list)
    foreign: list[tuple[UUID, bool]] = field(default_factory=list)
    notes: list[tuple[Note, bool]] = field(default_factory=list)
    unscheduled: list[UUID] = field(default_factory=list)

    async def note(
        self, notes: Sequence[Note], *, seen: bool, log_after: float, timeout: float
    ) -> list[tuple[UUID, bool]]:
        self.notes.extend((n, seen) for n in notes)
        found, self.foreign = self.foreign, []
        return found

    async def claim_due(
        self, limit: int, *, claim_seconds: float, active_seconds: float, timeout: float
    ) -> list[tuple[UUID, bytes | None]]:
        due, self.due = self.due, []
        return due

    async def unschedule(self, user_id: UUID, *, timeout: float) -> None:
        self.unscheduled.append(user_id)

    async def note_written(self, note: Note, *, timeout: float) -> None:
        self.notes.append((note, False))


async def test_a_tick_refreshes_the_due_token_and_reschedules_from_the_new_row() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    store.put(link(user, 0, clock.now() + timedelta(minutes=5)))
    idp = ScriptedIdp(tokens(1, clock))
    schedule = FakeSchedule(due=[(user, sha("refresh-0"))])
    bg = _background(store, clock, idp, schedule)
    await bg.tick()
    assert [s.reveal() for s in idp.sent] == ["refresh-0"]
    [(note, seen)] = schedule.notes
    assert (note.refresh_sha256, seen) == (sha("refresh-1"), False)


async def test_a_tick_never_refreshes_a_token_that_changed_since_it_was_scheduled() -> None:
    """Someone else (the product) rotated the token after the due time was computed: reschedule, count, no IdP."""
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    store.put(link(user, 7, clock.now() + timedelta(minutes=5)))
    idp = ScriptedIdp()
    counted: list[int] = []
    schedule = FakeSchedule(due=[(user, sha("refresh-0"))], foreign=[(user, True)])
    bg = _background(store, clock, idp, schedule, on_foreign=lambda: counted.append(1))
    await bg.tick()
    assert idp.sent == []
    assert [n.refresh_sha256 for n, _ in schedule.notes] == [sha("refresh-7")]
    assert counted == [1]


async def test_a_tick_unschedules_a_user_whose_link_is_gone() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    user = uuid.uuid4()
    schedule = FakeSchedule(due=[(user, sha("refresh-0"))])
    await _background(store, clock, ScriptedIdp(), schedule).tick()
    assert schedule.unscheduled == [user]


def test_settings_accept_sub_minute_values_and_zero_turns_the_background_off() -> None:
    base = {"BROKER_DATABASE_URL": "postgresql://svc:pw@db/app"}
    s = Settings.from_env(base)
    assert (s.product_refresh_window, s.active_window, s.background_jitter) == (600, 3600, 60)
    s = Settings.from_env(
        {**base, "BROKER_PRODUCT_REFRESH_WINDOW": "10", "BROKER_ACTIVE_WINDOW": "60", "BROKER_BACKGROUND_JITTER": "1"}
    )
    assert (s.product_refresh_window, s.active_window, s.background_jitter) == (10, 60, 1)
    assert Settings.from_env({**base, "BROKER_PRODUCT_REFRESH_WINDOW": "0"}).product_refresh_window == 0
    with pytest.raises(ConfigError) as err:
        Settings.from_env({**base, "BROKER_PRODUCT_REFRESH_WINDOW": "-1", "BROKER_ACTIVE_WINDOW": "0"})
    assert "BROKER_PRODUCT_REFRESH_WINDOW" in str(err.value)
    assert "BROKER_ACTIVE_WINDOW" in str(err.value)


def _refresher(
    store: FakeStore, clock: FakeClock, idp: ScriptedIdp, *, background: BackgroundSettings | None
) -> Refresher:
    liveness = Liveness(store, SETTINGS.heartbeat_interval)
    writeback = WriteBack(store, liveness, NullObserver(), store_timeout=1.0, warn_after=30.0, clock=clock.now)
    guarded = GuardedIdentityProvider(idp, CircuitBreaker(3, 10.0, clock=clock.monotonic), NullObserver())
    rejected = RejectedTokens(60.0, clock=clock.monotonic)
    return Refresher(
        RefreshParts(
            store,
            guarded,
            SETTINGS,
            writeback,
            liveness,
            rejected,
            NullObserver(),
            clock=clock.now,
            background=background,
        )
    )


def _background(
    store: FakeStore,
    clock: FakeClock,
    idp: ScriptedIdp,
    schedule: FakeSchedule,
    *,
    on_foreign: Callable[[], None] = lambda: None,
) -> BackgroundRefresh:
    return BackgroundRefresh(
        BS,
        schedule,
        store,
        _refresher(store, clock, idp, background=BS),
        Activity(BS),
        store_timeout=1.0,
        lifetime=lambda _uid: None,
        on_foreign=on_foreign,
        clock=clock.now,
    )


def test_a_note_never_carries_a_token() -> None:
    n = Note(uuid.uuid4(), Secret("refresh-secret").sha256(), None, 1.0, None)
    assert "refresh-secret" not in repr(n)
