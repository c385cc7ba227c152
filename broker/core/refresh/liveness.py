"""Heartbeats for the in-flight markers this process holds: how other replicas tell a busy holder from a dead one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from uuid import UUID

from broker.core.interfaces import LinkStore
from broker.errors import StoreUnavailable
from broker.model import Secret

log = logging.getLogger("broker.refresh")


class Liveness:
    """While this process has a link's refresh token at the IdP, or holds its rotated tokens for write-back, the
    marker's heartbeat is refreshed every `interval` seconds: one statement per tick for all markers held.

    A holder that is killed, or cut off from the database, stops beating; other replicas then take the marker over
    after `holder_dead_after`. Heartbeats that fail are simply missed: the next tick tries again."""

    def __init__(self, store: LinkStore, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._held: dict[UUID, Secret] = {}
        self._task: asyncio.Task[None] | None = None

    def hold(self, user_id: UUID, sent: Secret) -> None:
        """Start beating for the marker of `sent` (the refresh token sent to the IdP)."""
        self._held[user_id] = sent
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._beat(), name="in-flight heartbeat")

    def release(self, user_id: UUID, sent: Secret) -> None:
        """Stop beating for that marker (written back, abandoned, or left to die)."""
        if self._held.get(user_id) == sent:
            del self._held[user_id]

    def holds(self, user_id: UUID) -> bool:
        return user_id in self._held

    async def close(self) -> None:
        self._held.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _beat(self) -> None:
        while self._held:
            await asyncio.sleep(self._interval)
            held = list(self._held.items())
            if not held:
                return
            try:
                await self._store.heartbeat(held, timeout=self._interval)
            except StoreUnavailable as exc:
                log.debug("heartbeat missed: %s", exc)
