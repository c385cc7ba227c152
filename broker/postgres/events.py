"""The outbox of link events as the delivery sees it: claims and outcomes of webhook deliveries, the stream's reads,
the retention and the backlog. Every statement goes through the broker's SECURITY DEFINER functions (0008)."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import asyncpg

from broker.model import LinkEvent
from broker.postgres.store import PostgresStore

REGISTER = "SELECT token_broker.register_webhook_endpoint($1)"
STOP = "SELECT token_broker.stop_webhook_endpoint($1)"
CLAIM = "SELECT * FROM token_broker.claim_link_events($1, $2, $3, $4)"
SETTLE = "SELECT token_broker.settle_link_event($1, $2, $3, $4)"
READ = "SELECT * FROM token_broker.read_link_events($1, $2)"
BOUNDS = "SELECT * FROM token_broker.link_events_bounds()"
PRUNE = "SELECT token_broker.prune_link_events($1)"
BACKLOG = "SELECT token_broker.link_events_backlog()"


def _event(row: asyncpg.Record) -> LinkEvent:
    detail: dict[str, Any] = json.loads(row["detail"])
    return LinkEvent(
        id=int(row["id"]),
        type=str(row["type"]),
        user_id=UUID(str(row["user_id"])),
        occurred_at=row["occurred_at"],
        error=str(detail.get("error", "")),
        forced=bool(detail.get("forced", False)),
        recovered_by=str(detail.get("recovered_by", "")),
        attempts=int(row.get("attempts", 0) or 0),
    )


class PostgresEvents:
    """EventStore on the store's pool (each call one statement, bounded by `timeout`)."""

    def __init__(self, store: PostgresStore, timeout: float) -> None:
        self._store = store
        self._timeout = timeout

    async def register_endpoint(self, url_sha256: bytes) -> bool:
        """Record this endpoint; True when it is stopped (it answered 410 and the URL has not changed since)."""
        return bool(
            await self._store.run(self._timeout, "registering the webhook", lambda c: c.fetchval(REGISTER, url_sha256))
        )

    async def stop_endpoint(self, url_sha256: bytes) -> bool:
        """Stop the endpoint for every replica; True for the call that stopped it."""
        return bool(
            await self._store.run(self._timeout, "stopping the webhook", lambda c: c.fetchval(STOP, url_sha256))
        )

    async def claim(self, claimer: str, limit: int, lease: float, url_sha256: bytes) -> list[LinkEvent]:
        rows = await self._store.run(
            self._timeout, "claiming webhook deliveries", lambda c: c.fetch(CLAIM, claimer, limit, lease, url_sha256)
        )
        return [_event(r) for r in rows]

    async def settle(self, event_id: int, claimer: str, outcome: str, delay: float = 0.0) -> bool:
        return bool(
            await self._store.run(
                self._timeout,
                "recording a webhook delivery",
                lambda c: c.fetchval(SETTLE, event_id, claimer, outcome, delay),
                idempotent=True,
            )
        )

    async def read(self, after: int, limit: int) -> list[LinkEvent]:
        rows = await self._store.run(
            self._timeout, "reading link events", lambda c: c.fetch(READ, after, limit), idempotent=True
        )
        return [_event(r) for r in rows]

    async def bounds(self) -> tuple[int, int]:
        """(the latest id, the last id pruned by the retention)."""
        row = await self._store.run(self._timeout, "reading the event cursor bounds", lambda c: c.fetchrow(BOUNDS))
        assert row is not None
        return int(row["head"]), int(row["pruned"])

    async def prune(self, retention: float) -> int:
        return int(await self._store.run(self._timeout, "pruning link events", lambda c: c.fetchval(PRUNE, retention)))

    async def backlog_seconds(self) -> float:
        return float(
            await self._store.run(self._timeout, "measuring the webhook backlog", lambda c: c.fetchval(BACKLOG))
        )
