"""Refreshed tokens the IdP issued that are not in the database yet: served from memory, written back with retry."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from broker.core.interfaces import LinkStore, RefreshObserver
from broker.core.refresh.liveness import Liveness
from broker.errors import StoreUnavailable
from broker.model import Link, RefreshedTokens, Secret, TokenResult, TokenStatus, utcnow
from broker.telemetry.logs import UserLog

log = logging.getLogger("broker.refresh")

MAX_BACKOFF = 2.0


@dataclass(frozen=True, slots=True)
class Pending:
    """Rotated tokens not yet written, and the link as it was read when they were obtained (what the row still
    holds: the compare-and-set matches on its refresh token as stored)."""

    previous: Link
    tokens: RefreshedTokens

    @property
    def previous_refresh(self) -> Secret:
        return self.previous.refresh_token


class WriteBack:
    """Keeps rotated tokens until they are in the database. A refresh token the IdP rotated is never dropped:

    - each entry is written by a background task with compare-and-set on the refresh token that was sent, retried
      with exponential backoff (capped at MAX_BACKOFF) for as long as the process runs; after `warn_after` seconds
      it is logged as an error and counted, and it goes on;
    - while an entry waits, its in-flight marker keeps its heartbeat (Liveness), so no replica sends the consumed
      refresh token;
    - an entry is dropped only when it landed, or when the row no longer holds the token it replaces (a new login);
    - at shutdown (`drain`) each entry gets a last attempt; what still fails is logged by user id."""

    def __init__(
        self,
        store: LinkStore,
        liveness: Liveness,
        observer: RefreshObserver,
        *,
        store_timeout: float,
        warn_after: float,
        clock: Callable[[], datetime] = utcnow,
        on_landed: Callable[[UUID, RefreshedTokens], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._on_landed = on_landed
        self._liveness = liveness
        self._obs = observer
        self._timeout = store_timeout
        self._warn_after = warn_after
        self._clock = clock
        self._pending: dict[UUID, Pending] = {}
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        self._closing = False

    def __len__(self) -> int:
        return len(self._pending)

    def hold(self, user_id: UUID, pending: Pending) -> None:
        """Keep `pending` and write it in the background. The caller's liveness hold on the marker continues."""
        self._pending[user_id] = pending
        self._liveness.hold(user_id, pending.previous_refresh)
        task = self._tasks.get(user_id)
        if task is None or task.done():
            task = asyncio.create_task(self._retry(user_id), name=f"write-back:{user_id}")
            self._tasks[user_id] = task
            task.add_done_callback(functools.partial(self._retired, user_id))

    def pending(self, user_id: UUID) -> Pending | None:
        return self._pending.get(user_id)

    def reconcile(self, link: Link) -> Pending | None:
        """Given a row just read: the entry that must be served instead of it (the row still holds the consumed
        refresh token), else None. An entry that the row shows landed, or that a new login replaced, is dropped."""
        p = self._pending.get(link.user_id)
        if p is None or link.refresh_token == p.previous_refresh:
            return p
        self._forget(link.user_id, p)
        return None

    def serve(self, pending: Pending) -> TokenResult | None:
        """The pending access token, while it has not expired."""
        expiry = pending.tokens.expiry
        if expiry is not None and expiry <= self._clock():
            return None
        return TokenResult(TokenStatus.REFRESHED, pending.tokens.access_token, expiry, refreshed=True)

    async def land_now(self, user_id: UUID) -> bool:
        """One attempt to write the entry now; True when nothing is pending for the user afterwards."""
        p = self._pending.get(user_id)
        if p is None:
            return True
        try:
            await self._attempt(user_id, p)
        except StoreUnavailable:
            return False
        return user_id not in self._pending

    async def drain(self, timeout: float) -> None:
        """Shutdown: a last attempt for every entry, bounded by `timeout`; then the retry tasks end."""
        self._closing = True
        if self._pending:
            attempts = [asyncio.create_task(self.land_now(uid)) for uid in list(self._pending)]
            await asyncio.wait(attempts, timeout=timeout)
            for attempt in attempts:
                attempt.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=1.0)
        if self._pending:
            log.error(
                "shutting down with rotated tokens that could not be written back; these users must log in again",
                extra={"user_ids": [str(u) for u in self._pending]},
            )

    async def _retry(self, user_id: UUID) -> None:
        started = time.monotonic()
        delay = 0.05
        warned = False
        while not self._closing and (p := self._pending.get(user_id)) is not None:
            try:
                await self._attempt(user_id, p)
                continue
            except StoreUnavailable as exc:
                if not warned and time.monotonic() - started >= self._warn_after:
                    warned = True
                    self._obs.persist_failed()
                    UserLog(log, user_id).error(
                        "rotated tokens still not written back after %ss (%s); served from memory and retried "
                        "until the database answers",
                        self._warn_after,
                        exc,
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    def _retired(self, user_id: UUID, task: asyncio.Task[None]) -> None:
        """A retry task that ended is dropped (one per user whose write-back ever failed would otherwise be kept for
        the life of the process); a newer one for the same user is kept."""
        if self._tasks.get(user_id) is task:
            del self._tasks[user_id]

    async def _attempt(self, user_id: UUID, p: Pending) -> None:
        ok = await self._store.save_refreshed(p.previous, p.tokens, timeout=self._timeout)
        if ok:
            UserLog(log, user_id).info("rotated tokens written back")
            if self._on_landed is not None:
                await self._on_landed(user_id, p.tokens)
        else:
            UserLog(log, user_id).warning("rotated tokens not written: the link changed meanwhile (new login)")
        self._forget(user_id, p)

    def _forget(self, user_id: UUID, p: Pending) -> None:
        if self._pending.get(user_id) is p:
            del self._pending[user_id]
            self._liveness.release(user_id, p.previous_refresh)
