"""Webhook delivery of link events: claims each user's oldest undelivered event from the outbox, POSTs it signed
(Standard Webhooks), and records the outcome. Runs in every worker of every replica; the claims keep one user's
events in order and never two at once, and a claim left by a dead process lapses after its lease."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlsplit

import httpx2

from broker import __version__
from broker.errors import StoreUnavailable
from broker.events import payload
from broker.model import LinkEvent

log = logging.getLogger("broker.webhook")

#: Events claimed at once by one process (each user's oldest only).
IN_FLIGHT = 16


class EventStore(Protocol):
    async def register_endpoint(self, url_sha256: bytes) -> bool: ...

    async def stop_endpoint(self, url_sha256: bytes) -> bool: ...

    async def claim(self, claimer: str, limit: int, lease: float, url_sha256: bytes) -> list[LinkEvent]: ...

    async def settle(self, event_id: int, claimer: str, outcome: str, delay: float = 0.0) -> bool: ...


def redacted(url: str) -> str:
    """The URL for logs: scheme, host, port and path; never user info or a query (either may hold a secret)."""
    p = urlsplit(url)
    host = p.hostname or ""
    return f"{p.scheme}://{host}{f':{p.port}' if p.port else ''}{p.path}"


class WebhookDelivery:
    """The delivery loop of one process."""

    def __init__(
        self,
        events: EventStore,
        url: str,
        key: bytes,
        *,
        timeout: float,
        retry_period: float,
        poll_interval: float,
        on_result: Callable[[str], None],
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self._events = events
        self._url = url
        self._url_sha256 = hashlib.sha256(url.encode()).digest()
        self._key = key
        self._timeout = timeout
        self._lease = timeout + 5.0
        self._retry_period = retry_period
        self._poll = poll_interval
        self._on_result = on_result
        self._claimer = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._client = httpx2.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
            headers={"user-agent": f"token-broker/{__version__}"},
        )
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._stopped = False

    def wake(self, _event_type: str = "") -> None:
        """An event was just written here: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            try:
                self._stopped = await self._events.register_endpoint(self._url_sha256)
                break
            except StoreUnavailable as exc:
                log.warning("webhook endpoint not registered yet: %s", exc)
                await asyncio.sleep(max(self._poll, 1.0))
        if self._stopped:
            log.error(
                "webhook endpoint %s answered 410 Gone earlier: not delivering until BROKER_WEBHOOK_URL changes",
                redacted(self._url),
            )
        try:
            while True:
                claimed = await self._claim()
                if claimed:
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
        finally:
            for task in list(self._running):
                task.cancel()
            if self._running:
                await asyncio.wait(list(self._running), timeout=1.0)
            await self._client.aclose()

    async def _claim(self) -> bool:
        """Claim what is due (up to the free slots) and start delivering it; True when something was claimed."""
        free = IN_FLIGHT - len(self._running)
        if free <= 0:
            await asyncio.wait(list(self._running), return_when=asyncio.FIRST_COMPLETED)
            return True
        try:
            events = await self._events.claim(self._claimer, free, self._lease, self._url_sha256)
        except StoreUnavailable as exc:
            log.debug("webhook deliveries not claimed: %s", exc)  # every poll while the database is down
            return False
        for event in events:
            task = asyncio.create_task(self._deliver(event), name=f"webhook:{event.id}")
            self._running.add(task)
            task.add_done_callback(self._done)
        return bool(events)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # the user's next event may be due now

    async def _deliver(self, event: LinkEvent) -> None:
        body = payload.body(event)
        try:
            response = await self._client.post(
                self._url, content=body, headers=payload.headers(self._key, event, body, time.time())
            )
            status: int | None = response.status_code
            why = f"HTTP {status}"
        except httpx2.HTTPError as exc:
            status, why = None, type(exc).__name__
        except Exception:
            log.exception("webhook delivery of event %s failed unexpectedly", event.id)
            status, why = None, "error"
        try:
            await self._settle(event, status, why)
        except StoreUnavailable as exc:
            # The claim lapses after its lease and the event is sent again: at least once.
            log.warning("outcome of webhook delivery %s not recorded: %s", event.id, exc)

    async def _settle(self, event: LinkEvent, status: int | None, why: str) -> None:
        if status is not None and 200 <= status < 300:
            await self._events.settle(event.id, self._claimer, "delivered")
            self._on_result("delivered")
            log.debug("webhook delivered", extra={"event_id": event.id, "attempts": event.attempts})
            return
        if status == 410:
            self._on_result("gone")
            await self._events.settle(event.id, self._claimer, "retry", 0.0)
            if await self._events.stop_endpoint(self._url_sha256):
                log.error(
                    "webhook endpoint %s answered 410 Gone: stopped for every replica until BROKER_WEBHOOK_URL "
                    "changes; events wait in the outbox",
                    redacted(self._url),
                )
            return
        age = (datetime.now(UTC) - event.occurred_at).total_seconds()
        if age >= self._retry_period:
            await self._events.settle(event.id, self._claimer, "failed")
            self._on_result("failed")
            log.error(
                "webhook delivery of event %s failed for good after %d attempts over %.0fs (last: %s)",
                event.id,
                event.attempts,
                age,
                why,
                extra={"event_id": event.id, "event_type": event.type, "user_id": str(event.user_id)},
            )
            return
        delay = payload.backoff(event.attempts, random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
        await self._events.settle(event.id, self._claimer, "retry", delay)
        self._on_result("retry")
        log.info("webhook delivery of event %s failed (%s); retrying in %.1fs", event.id, why, delay)
