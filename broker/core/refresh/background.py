"""Living beside the product's own refreshers: active users' tokens are refreshed in the background before they enter
the product's refresh window, and rotations no broker made are counted.

The product refreshes the same rows with no lock and no compare-and-set (when a token has expired, and at builds
when it expires within its window); an IdP with reuse detection revokes the grant when both send one refresh token.
An active user (a caller asked within BROKER_ACTIVE_WINDOW) never reaches those windows: the broker refreshes at
expiry - window - ticks - jitter, never before half the token's lifetime, with the usual single-flight, row lock and
in-flight marker. Idle users are left alone, so their IdP sessions end by the IdP's idle policy. See
docs/coexistence.md.

Cost: a request only touches a dict (a user is noted again at most every active window / 10, or when the refresh
token changed); each replica, once per tick, writes its notes in one statement and claims the due refreshes in
another (an index range scan over due rows only; a claim makes other replicas skip the user).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from uuid import UUID

from broker.core.interfaces import LinkStore
from broker.core.policy import jwt_lifetime
from broker.core.refresh.refresher import Refresher
from broker.core.refresh.schedule import BackgroundSettings, Note, ScheduleStore
from broker.errors import StoreUnavailable
from broker.model import AccountState, Link, Secret, TokenStatus, utcnow
from broker.telemetry.logs import UserLog

log = logging.getLogger("broker.refresh")

#: Answers after which a background refresh has nothing more to do until the user is seen again.
_UNSCHEDULE = {TokenStatus.NO_LINK, TokenStatus.EXPIRED, TokenStatus.REAUTH_REQUIRED, TokenStatus.ACCOUNT_DISABLED}


class Activity:
    """The users this process served, to be noted in the schedule (in memory until the next tick). Bounded."""

    def __init__(self, settings: BackgroundSettings, *, limit: int = 100_000) -> None:
        self._settings = settings
        self._limit = limit
        self._noted: dict[UUID, tuple[Secret, float]] = {}  # refresh token last noted, and when (monotonic)
        self._pending: dict[UUID, Link] = {}

    def seen(self, link: Link) -> None:
        """A caller asked for this user's token (the hot path: memory only)."""
        last = self._noted.get(link.user_id)
        now = time.monotonic()
        if last is not None and last[0] == link.refresh_token and now - last[1] < self._settings.renote_after:
            return
        if len(self._noted) >= self._limit:
            self._noted.pop(next(iter(self._noted)))
        self._noted[link.user_id] = (link.refresh_token, now)
        self._pending[link.user_id] = link

    def take(self) -> list[Link]:
        links, self._pending = list(self._pending.values()), {}
        return links

    def forget(self, user_id: UUID) -> None:
        """The note did not reach the database: note the user again on the next request."""
        self._noted.pop(user_id, None)


class BackgroundRefresh:
    """Each tick: write the notes, count foreign rotations, claim the due refreshes and run them through the
    refresher (single-flight, row lock, in-flight marker)."""

    def __init__(
        self,
        settings: BackgroundSettings,
        schedule: ScheduleStore,
        store: LinkStore,
        refresher: Refresher,
        activity: Activity,
        *,
        store_timeout: float,
        lifetime: Callable[[UUID], timedelta | None],
        on_foreign: Callable[[], None],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._schedule = schedule
        self._store = store
        self._refresher = refresher
        self._timeout = store_timeout
        self._lifetime = lifetime
        self._on_foreign = on_foreign
        self._clock = clock
        self.activity = activity

    def note(self, link: Link, *, lifetime: timedelta | None = None) -> Note:
        """What the schedule records of `link` (its refresh token by SHA-256 only)."""
        known = lifetime or self._lifetime(link.user_id) or jwt_lifetime(link.access_token)
        return Note(
            link.user_id,
            link.refresh_token.sha256(),
            link.expiry,
            self._settings.ahead(link.user_id),
            known.total_seconds() if known is not None else None,
        )

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.interval)
            try:
                await self.tick()
            except StoreUnavailable as exc:
                log.debug("background refresh tick missed: %s", exc)
            except Exception:
                log.exception("background refresh tick failed")

    async def tick(self) -> None:
        await self._flush()
        due = await self._schedule.claim_due(
            self._settings.batch,
            claim_seconds=self._settings.claim_seconds,
            active_seconds=self._settings.active_window,
            timeout=self._timeout,
        )
        if due:
            await asyncio.gather(*(self._refresh(uid, sha) for uid, sha in due))

    async def _flush(self) -> None:
        links = self.activity.take()
        if not links:
            return
        try:
            await self._note([self.note(link) for link in links], seen=True)
        except StoreUnavailable:
            for link in links:
                self.activity.forget(link.user_id)
            raise

    async def _note(self, notes: list[Note], *, seen: bool) -> None:
        rotations = await self._schedule.note(
            notes, seen=seen, log_after=self._settings.active_window, timeout=self._timeout
        )
        for uid, first in rotations:
            self._on_foreign()
            if first:
                UserLog(log, uid).info(
                    "the refresh token was rotated by someone other than a broker (the product, or a new login)"
                )

    async def _refresh(self, user_id: UUID, sha: bytes | None) -> None:
        ulog = UserLog(log, user_id)
        try:
            link = await self._store.get_link(user_id, timeout=self._timeout)
            if link is None or link.account is AccountState.DISABLED or link.unreadable or not link.refresh_token:
                await self._schedule.unschedule(user_id, timeout=self._timeout)
                return
            if sha is None or link.refresh_token.sha256() == sha:
                # The token the refresh was scheduled for: refresh it (the lock re-reads; a newer row is used).
                result = await self._refresher.refresh(link, time.monotonic() + self._timeout)
                if result.status in _UNSCHEDULE or result.failure in _UNSCHEDULE:
                    await self._schedule.unschedule(user_id, timeout=self._timeout)
                    return
                if not result.refreshed:
                    return  # not refreshed (the IdP is down): the claim lapses and a replica tries again
                link = await self._store.get_link(user_id, timeout=self._timeout)
                if link is None:
                    return
            # Reschedule from the row as it is now (and count it when someone else rotated it).
            await self._note([self.note(link)], seen=False)
        except StoreUnavailable as exc:
            ulog.debug("background refresh not done: %s", exc)
