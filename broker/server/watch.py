"""WatchLinkEvents: the link events after a cursor, then live ones, polled from the outbox (no LISTEN, so it works
behind PgBouncer in transaction pooling). Ids are written in commit order (0008), so a cursor never skips one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Protocol

import grpc

from broker.errors import StoreUnavailable
from broker.model import LinkEvent
from broker.server.entry import Rejected, current_call
from broker.v1 import token_broker_pb2 as pb

log = logging.getLogger("broker.watch")

_CURSOR = re.compile(r"(?:evt_)?([0-9]{1,18})")
BATCH = 100


class EventFeed(Protocol):
    async def read(self, after: int, limit: int) -> list[LinkEvent]: ...

    async def bounds(self) -> tuple[int, int]: ...


def to_proto(event: LinkEvent) -> pb.LinkEvent:
    message = pb.LinkEvent(
        id=str(event.id),
        type=event.type,
        user_id=str(event.user_id),
        error=event.error,
        forced=event.forced,
        recovered_by=event.recovered_by,
    )
    at = event.occurred_at.astimezone(UTC)
    message.occurred_at.seconds = int(at.timestamp())
    message.occurred_at.nanos = at.microsecond * 1000
    return message


def parse_cursor(text: str) -> int | None:
    """The id in a cursor ("123", or the webhook-id form "evt_123"); None for "" (live only); ValueError else."""
    if text == "":
        return None
    m = _CURSOR.fullmatch(text)
    if m is None:
        raise ValueError(text)
    return int(m.group(1))


class LinkEventWatch:
    """The stream's body; the entry (broker.server.entry) admits the watcher, audits and counts the stream."""

    def __init__(self, feed: EventFeed | None, poll_interval: float, stopping: asyncio.Event) -> None:
        self._feed = feed
        self._poll = poll_interval
        self._stopping = stopping

    async def watch(
        self, request: pb.WatchLinkEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchLinkEventsResponse]:
        if self._feed is None:
            raise Rejected(grpc.StatusCode.FAILED_PRECONDITION, "link events need the PostgreSQL store")
        try:
            wanted = parse_cursor(request.after)
        except ValueError:
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT, "after must be the id of a link event, or empty for live events"
            ) from None
        try:
            head, pruned = await self._feed.bounds()
        except StoreUnavailable as exc:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, f"link events unavailable: {exc}") from None
        if wanted is None:
            after = head
        elif wanted > head:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "after names no event of this broker")
        elif wanted < pruned:
            raise Rejected(
                grpc.StatusCode.OUT_OF_RANGE,
                "events after this cursor are past the retention (BROKER_EVENT_RETENTION); start again with an "
                "empty cursor",
            )
        else:
            after = wanted
        record = current_call.get()
        while True:
            if self._stopping.is_set():
                raise Rejected(grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect with your cursor")
            try:
                batch = await self._feed.read(after, BATCH)
            except StoreUnavailable as exc:
                log.debug("link events not read: %s", exc)  # every poll while the database is down
                batch = []
            for event in batch:
                yield pb.WatchLinkEventsResponse(event=to_proto(event))
                after = event.id
                if record is not None:
                    record.events += 1
            if len(batch) < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=self._poll)
