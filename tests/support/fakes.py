"""In-memory implementations of broker.core.interfaces for the fast unit tests of the refresh core.

They stage on cue what real services cannot: a rotation between the read and the rejection, a save that fails after
the IdP answered, a commit that fails, an IdP that answers only when the test says so. tests/contract runs the same
behavioural tests on FakeStore and PostgresStore, so the fake is held to what PostgreSQL does; the integration tests
against PostgreSQL and oidc-provider remain the proof, these are the fast map.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

from broker.core.refresh.schedule import Note
from broker.errors import IdpOutcomeUnknown, IdpRejected, IdpUnavailable, RefreshLockTimeout, StoreUnavailable
from broker.model import DbKey, Link, RefreshedTokens, Secret

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """Wall time (for expiries) and monotonic time (for back-offs and markers), moved only by the test."""

    def __init__(self) -> None:
        self.wall = START
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


def _sha(token: Secret) -> bytes:
    return hashlib.sha256(token.reveal().encode()).digest()


@dataclass
class Marker:
    refresh_sha256: bytes
    heartbeat: float


@dataclass
class Faults:
    """Failures the next operations meet; counters go down as they are used."""

    get: int = 0
    lock: int = 0
    save_in_lock: int = 0
    commit: int = 0
    save_refreshed: int = 0
    heartbeat: bool = False
    clear_in_flight: int = 0
    remember_rejected: int = 0


@dataclass
class FakeStore:
    """A LinkStore over a dict, with the SQL functions' semantics (compare-and-set, marker by hash, heartbeats)."""

    clock: FakeClock
    rows: dict[UUID, Link] = field(default_factory=dict)
    markers: dict[UUID, Marker] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    after_lock: Callable[[], Awaitable[None]] | None = None
    events: list[str] = field(default_factory=list)
    forced_at: dict[UUID, float] = field(default_factory=dict)
    keys: list[DbKey] = field(default_factory=list)  # the product's dbcrypt_keys rows, in their order
    deleted: set[UUID] = field(default_factory=set)  # users the product deleted: its trigger refuses their writes
    rejected_access: dict[UUID, bytes] = field(default_factory=dict)
    written: list[Note] = field(default_factory=list)  # notes of written refresh tokens (background schedule)
    states: dict[UUID, bytes] = field(default_factory=dict)  # link_state: the fingerprint recorded as dead
    link_events: list[tuple[str, UUID]] = field(default_factory=list)
    _locks: dict[UUID, asyncio.Lock] = field(default_factory=dict)

    def put(self, link: Link) -> None:
        self.rows[link.user_id] = link

    async def get_link(self, user_id: UUID, *, timeout: float) -> Link | None:
        await asyncio.sleep(0)
        if self.faults.get:
            self.faults.get -= 1
            raise StoreUnavailable("fake: read failed")
        row = self.rows.get(user_id)
        if row is None:
            return None
        return replace(
            row,
            access_rejected=self.rejected_access.get(user_id) == _sha(row.access_token),
            reauth_fingerprint=self.states.get(user_id),
        )

    def note_dead(self, user_id: UUID, fingerprint: bytes) -> bool:
        """note_reauth_required's semantics: once per change (another fingerprint is a recovery and a new state)."""
        old = self.states.get(user_id)
        if old == fingerprint:
            return False
        if old is not None:
            self.link_events.append(("link.recovered", user_id))
        self.states[user_id] = fingerprint
        self.link_events.append(("link.reauth_required", user_id))
        return True

    def note_alive(self, user_id: UUID, fingerprint: bytes) -> bool:
        if self.states.get(user_id) != fingerprint:
            return False
        del self.states[user_id]
        self.link_events.append(("link.recovered", user_id))
        return True

    async def note_reauth_required(self, link: Link, error: str, *, forced: bool, timeout: float) -> bool:
        return self.note_dead(link.user_id, link.fingerprint())

    async def note_recovered(self, user_id: UUID, fingerprint: bytes, how: str, *, timeout: float) -> bool:
        return self.note_alive(user_id, fingerprint)

    @asynccontextmanager
    async def lock_link(self, user_id: UUID, *, lock_timeout: float, hold_timeout: float) -> AsyncIterator[FakeLocked]:
        if self.faults.lock:
            self.faults.lock -= 1
            raise StoreUnavailable("fake: lock failed")
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        try:
            async with asyncio.timeout(lock_timeout):
                await lock.acquire()
        except TimeoutError:
            raise RefreshLockTimeout(f"refresh lock not acquired within {lock_timeout}s") from None
        try:
            self.events.append("lock")
            locked = FakeLocked(self, user_id, self._read_locked(user_id))
            yield locked
            if self.faults.commit:
                self.faults.commit -= 1
                self.events.append("commit failed")
                raise StoreUnavailable("fake: commit failed")
            if locked.staged is not None:
                self._apply(user_id, locked.staged)
            if locked.forced:
                self.forced_at[user_id] = self.clock.monotonic()
            self.events.append("commit")
        finally:
            lock.release()
        if self.after_lock is not None:
            await self.after_lock()

    def _read_locked(self, user_id: UUID) -> Link | None:
        row = self.rows.get(user_id)
        if row is None:
            return None
        marker = self.markers.get(user_id)
        idle = None
        if marker is not None and marker.refresh_sha256 == _sha(row.refresh_token):
            idle = self.clock.monotonic() - marker.heartbeat
        forced = self.forced_at.get(user_id)
        ago = None if forced is None else self.clock.monotonic() - forced
        return replace(
            row, marker_idle_seconds=idle, forced_seconds_ago=ago, reauth_fingerprint=self.states.get(user_id)
        )

    def _cas(self, user_id: UUID, expected: Secret, tokens: RefreshedTokens) -> tuple[bool, Link | None]:
        row = self.rows.get(user_id)
        if row is None or row.refresh_token not in (expected, tokens.refresh_token):
            return False, None
        if user_id in self.deleted:
            raise StoreUnavailable("fake: database error while writing refreshed tokens: RaiseError")
        new = replace(row, access_token=tokens.access_token, refresh_token=tokens.refresh_token, expiry=tokens.expiry)
        return True, new

    def _apply(self, user_id: UUID, staged: tuple[Secret, RefreshedTokens]) -> None:
        expected, tokens = staged
        ok, new = self._cas(user_id, expected, tokens)
        if ok and new is not None:
            self.rows[user_id] = new
            marker = self.markers.get(user_id)
            if marker is not None and marker.refresh_sha256 == _sha(expected):
                del self.markers[user_id]

    async def dbcrypt_keys(self, *, timeout: float) -> list[DbKey]:
        return list(self.keys)

    async def save_refreshed(self, previous: Link, tokens: RefreshedTokens, *, timeout: float) -> bool:
        user_id, previous_refresh = previous.user_id, previous.refresh_token
        await asyncio.sleep(0)
        if self.faults.save_refreshed:
            self.faults.save_refreshed -= 1
            self.events.append("save_refreshed failed")
            raise StoreUnavailable("fake: write-back failed")
        ok, _ = self._cas(user_id, previous_refresh, tokens)
        if ok:
            self._apply(user_id, (previous_refresh, tokens))
        self.events.append(f"save_refreshed {ok}")
        return ok

    async def heartbeat(self, held: Sequence[tuple[UUID, Secret]], *, timeout: float) -> None:
        if self.faults.heartbeat:
            raise StoreUnavailable("fake: heartbeat failed")
        for user_id, token in held:
            marker = self.markers.get(user_id)
            if marker is not None and marker.refresh_sha256 == _sha(token):
                marker.heartbeat = self.clock.monotonic()

    async def ping(self, *, timeout: float) -> bool:
        return True

    async def remember_rejected(self, user_id: UUID, access_sha256: bytes, *, timeout: float) -> None:
        await asyncio.sleep(0)
        if self.faults.remember_rejected:
            self.faults.remember_rejected -= 1
            raise StoreUnavailable("fake: remembering the rejection failed")
        self.rejected_access[user_id] = access_sha256
        self.events.append("remember_rejected")


@dataclass
class FakeLocked:
    """A LockedLink of FakeStore: `save` and `note_forced` stage their writes, committed when the lock context exits
    cleanly (as in the locked transaction); the in-flight marker is committed at once."""

    store: FakeStore
    user_id: UUID
    link: Link | None
    staged: tuple[Secret, RefreshedTokens] | None = None
    forced: bool = False

    async def save(self, tokens: RefreshedTokens) -> bool:
        assert self.link is not None
        await asyncio.sleep(0)
        if self.store.faults.save_in_lock:
            self.store.faults.save_in_lock -= 1
            self.store.events.append("save failed")
            raise StoreUnavailable("fake: save failed")
        ok, _ = self.store._cas(self.user_id, self.link.refresh_token, tokens)
        if ok:
            self.staged = (self.link.refresh_token, tokens)
        return ok

    async def note_forced(self) -> None:
        self.forced = True

    async def note_written(self, note: Note) -> None:
        self.store.written.append(note)

    async def note_reauth_required(self, error: str, *, forced: bool) -> bool:
        assert self.link is not None
        return self.store.note_dead(self.user_id, self.link.fingerprint())

    async def note_recovered(self, fingerprint: bytes, how: str) -> bool:
        return self.store.note_alive(self.user_id, fingerprint)

    async def mark_in_flight(self) -> None:
        assert self.link is not None
        await asyncio.sleep(0)
        self.store.markers[self.user_id] = Marker(_sha(self.link.refresh_token), self.store.clock.monotonic())
        self.store.events.append("mark")

    async def clear_in_flight(self) -> None:
        assert self.link is not None
        if self.store.faults.clear_in_flight:
            self.store.faults.clear_in_flight -= 1
            return
        marker = self.store.markers.get(self.user_id)
        if marker is not None and marker.refresh_sha256 == _sha(self.link.refresh_token):
            del self.store.markers[self.user_id]
        self.store.events.append("clear")


Answer = RefreshedTokens | BaseException | Callable[[Secret], Awaitable[RefreshedTokens]]


class ScriptedIdp:
    """An IdentityProvider that answers from a script, one entry per call, and records what it was sent."""

    def __init__(self, *answers: Answer) -> None:
        self.script: list[Answer] = list(answers)
        self.sent: list[Secret] = []

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens:
        self.sent.append(refresh_token)
        await asyncio.sleep(0)
        if not self.script:
            raise AssertionError("the IdP was called more often than the test scripted")
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, RefreshedTokens):
            return answer
        return await answer(refresh_token)


class RotatingIdp:
    """An IdentityProvider with oidc-provider's rotation (tests/idp): each refresh token is good once; a used one
    is refused with invalid_grant and revokes its whole grant (reuse detection). `fault` "down" answers as an outage
    before the token is looked at, "garbage" as an unreadable 2xx. tests/contract holds it to the real adapter on the
    real test IdP. Its `refresh` is also a ScriptedIdp answer."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.fault = "ok"
        self._issued = 0
        self._grants = 0
        self._grant_of: dict[str, int] = {}  # every refresh token issued -> its grant
        self._live: set[str] = set()
        self._revoked: set[int] = set()

    def login(self) -> RefreshedTokens:
        """A new grant, as the authorization-code flow gives it."""
        self._grants += 1
        return self._issue(self._grants)

    def _issue(self, grant: int) -> RefreshedTokens:
        self._issued += 1
        refresh = f"rt-{self._issued}"
        self._grant_of[refresh] = grant
        self._live.add(refresh)
        expiry = self.clock.now() + timedelta(seconds=self.lifetime)
        return RefreshedTokens(Secret(f"at-{self._issued}"), Secret(refresh), expiry)

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens:
        await asyncio.sleep(0)
        if self.fault == "down":
            raise IdpUnavailable("fake: identity provider answered 503")
        if self.fault == "garbage":
            raise IdpOutcomeUnknown("fake: unreadable 2xx")
        token = refresh_token.reveal()
        grant = self._grant_of.get(token)
        if grant is None or grant in self._revoked:
            raise IdpRejected("invalid_grant")
        if token not in self._live:  # reuse: the grant is revoked, its latest token with it
            self._revoked.add(grant)
            self._live -= {t for t, g in self._grant_of.items() if g == grant}
            raise IdpRejected("invalid_grant")
        self._live.discard(token)
        return self._issue(grant)


def tokens(n: int, clock: FakeClock, lifetime: float = 3600) -> RefreshedTokens:
    return RefreshedTokens(Secret(f"access-{n}"), Secret(f"refresh-{n}"), clock.now() + timedelta(seconds=lifetime))


def link(user_id: UUID, n: int, expiry: datetime | None) -> Link:
    return Link(user_id, Secret(f"access-{n}"), Secret(f"refresh-{n}"), expiry)
