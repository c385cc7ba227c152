"""A LinkStore that forwards every call to a wrapped one, for tests that change one or two of them on cue.

    class HeldReads(DelegatingStore):
        async def get_link(self, user_id, *, timeout):
            await gate.wait()
            return await super().get_link(user_id, timeout=timeout)

A test overrides `lock_link` through `locked()` (wrap the LockedLink in a DelegatingLocked subclass) or `unlocked()`
(run something right after the lock is released), so the lock itself is always the wrapped store's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from uuid import UUID

from broker.core.interfaces import LinkStore, LockedLink
from broker.core.refresh.schedule import Note
from broker.errors import StoreUnavailable
from broker.model import DbKey, Link, RefreshedTokens, Secret


class DelegatingLocked:
    """A LockedLink that forwards every call to `inner`."""

    def __init__(self, inner: LockedLink) -> None:
        self.inner = inner
        self.link = inner.link  # read once, when the lock was taken

    async def save(self, tokens: RefreshedTokens) -> bool:
        return await self.inner.save(tokens)

    async def mark_in_flight(self) -> None:
        await self.inner.mark_in_flight()

    async def clear_in_flight(self) -> None:
        await self.inner.clear_in_flight()

    async def note_forced(self) -> None:
        await self.inner.note_forced()

    async def note_written(self, note: Note) -> None:
        await self.inner.note_written(note)

    async def note_reauth_required(self, error: str, *, forced: bool) -> bool:
        return await self.inner.note_reauth_required(error, forced=forced)

    async def note_recovered(self, fingerprint: bytes, how: str) -> bool:
        return await self.inner.note_recovered(fingerprint, how)


class DelegatingStore:
    """A LinkStore that forwards every call to `inner`; subclass it and override what the test changes."""

    def __init__(self, inner: LinkStore) -> None:
        self.inner = inner

    async def get_link(self, user_id: UUID, *, timeout: float) -> Link | None:
        return await self.inner.get_link(user_id, timeout=timeout)

    @asynccontextmanager
    async def lock_link(self, user_id: UUID, *, lock_timeout: float, hold_timeout: float) -> AsyncIterator[LockedLink]:
        try:
            async with self.inner.lock_link(user_id, lock_timeout=lock_timeout, hold_timeout=hold_timeout) as locked:
                yield self.locked(locked)
        finally:
            await self.unlocked()

    def locked(self, inner: LockedLink) -> LockedLink:
        """What the lock's block gets: `inner` itself unless overridden."""
        return inner

    async def unlocked(self) -> None:
        """Runs right after the lock is released (committed, rolled back, or never taken); nothing unless
        overridden."""

    async def save_refreshed(self, previous: Link, tokens: RefreshedTokens, *, timeout: float) -> bool:
        return await self.inner.save_refreshed(previous, tokens, timeout=timeout)

    async def dbcrypt_keys(self, *, timeout: float) -> list[DbKey]:
        return await self.inner.dbcrypt_keys(timeout=timeout)

    async def heartbeat(self, held: Sequence[tuple[UUID, Secret]], *, timeout: float) -> None:
        await self.inner.heartbeat(held, timeout=timeout)

    async def ping(self, *, timeout: float) -> bool:
        return await self.inner.ping(timeout=timeout)

    async def remember_rejected(self, user_id: UUID, access_sha256: bytes, *, timeout: float) -> None:
        await self.inner.remember_rejected(user_id, access_sha256, timeout=timeout)

    async def note_reauth_required(self, link: Link, error: str, *, forced: bool, timeout: float) -> bool:
        return await self.inner.note_reauth_required(link, error, forced=forced, timeout=timeout)

    async def note_recovered(self, user_id: UUID, fingerprint: bytes, how: str, *, timeout: float) -> bool:
        return await self.inner.note_recovered(user_id, fingerprint, how, timeout=timeout)


class SavesFail(DelegatingStore):
    """A store whose writes of refreshed tokens fail while `failing` (a holder whose writes keep failing while its
    heartbeat still reaches the database)."""

    def __init__(self, inner: LinkStore) -> None:
        super().__init__(inner)
        self.failing = True

    async def save_refreshed(self, previous: Link, tokens: RefreshedTokens, *, timeout: float) -> bool:
        if self.failing:
            raise StoreUnavailable("test: writes fail")
        return await super().save_refreshed(previous, tokens, timeout=timeout)

    def locked(self, inner: LockedLink) -> LockedLink:
        return _FailingSave(inner, self)


class _FailingSave(DelegatingLocked):
    def __init__(self, inner: LockedLink, store: SavesFail) -> None:
        super().__init__(inner)
        self.store = store

    async def save(self, tokens: RefreshedTokens) -> bool:
        if self.store.failing:
            raise StoreUnavailable("test: writes fail")
        return await super().save(tokens)
