"""The valid-token read path: a few connections held for reads ("lanes"), and batches when every lane is busy.

A read takes a free lane and runs at once: no pool checkout, no task, no wait for anything to fill. When every lane
is busy, the request joins the open batch, which is sent on the next lane that frees up, as one statement for all
its keys. A request joins only a batch that has not been sent yet (a batch is sealed when it gets its lane), so a
read never started before a request it answers: every answer reflects what was committed before the request began.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, Protocol, TypeVar

from broker.errors import StoreUnavailable

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
C = TypeVar("C")


class ConnectionSource(Protocol[C]):
    """Where lanes get their connections, and where a connection goes back (broken: terminated first)."""

    async def acquire(self) -> C: ...

    async def give_back(self, conn: C, broken: bool) -> None: ...


#: fetch(conn, keys): the values of the keys found (a key without a value is absent).
Fetch = Callable[[C, list[K]], Awaitable[Mapping[K, V]]]


class _Batch(Generic[K, V]):
    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[tuple[K, asyncio.Future[V | None], float]] = []  # key, answer, deadline

    def live(self) -> tuple[list[K], float]:
        """The keys still awaited and the latest deadline among their callers (time.monotonic()); no keys when
        every caller gave up (timed out or cancelled)."""
        now = time.monotonic()
        alive = [(key, deadline) for key, answer, deadline in self.waiters if not answer.done() and deadline > now]
        return list(dict.fromkeys(key for key, _ in alive)), max((d for _, d in alive), default=now)


class ReadLanes(Generic[C, K, V]):
    """`get(key)` on `lanes` connections held from `source`; batches of at most `max_batch` requests when all are
    busy. `reusable(exc)`: whether a connection is still fine after `exc` (an SQL error), else it is terminated."""

    def __init__(
        self,
        source: ConnectionSource[C],
        fetch: Fetch[C, K, V],
        reusable: Callable[[BaseException], bool],
        *,
        lanes: int = 2,
        max_batch: int = 128,
    ) -> None:
        self._source = source
        self._fetch = fetch
        self._reusable = reusable
        self._free: list[C | None] = [None] * lanes  # None: a lane whose connection is opened on first use
        self._max = max_batch
        self._waiting: deque[_Batch[K, V]] = deque()  # batches waiting for a lane, oldest first
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    async def get(self, key: K, timeout: float) -> V | None:
        """The value for `key` read after this call began; TimeoutError after `timeout` seconds; the database's
        own errors as raised."""
        if self._free and not self._waiting:
            return (await self._read(self._free.pop(), [key], timeout)).get(key)
        batch = self._waiting[-1] if self._waiting else None
        if batch is None or len(batch.waiters) >= self._max:
            batch = _Batch()
            self._waiting.append(batch)
        answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        batch.waiters.append((key, answer, time.monotonic() + timeout))
        async with asyncio.timeout(timeout):
            return await answer

    async def _read(self, conn: C | None, keys: list[K], timeout: float) -> Mapping[K, V]:
        """One statement on a lane; the lane is free again afterwards, with its connection unless it broke."""
        try:
            async with asyncio.timeout(timeout):
                if conn is None:
                    conn = await self._source.acquire()
                values = await self._fetch(conn, keys)
        except BaseException as exc:
            if conn is not None and not self._reusable(exc):
                await self._source.give_back(conn, True)
                conn = None
            self._free_lane(conn)
            raise
        self._free_lane(conn)
        return values

    def _free_lane(self, conn: C | None) -> None:
        if self._closed:
            if conn is not None:
                self._spawn(self._source.give_back(conn, False))
            return
        while self._waiting:
            batch = self._waiting.popleft()  # sealed: later requests start the next batch
            keys, deadline = batch.live()
            if keys:
                self._spawn(self._send(conn, batch, keys, deadline))
                return
            # Every caller of this batch gave up: nothing is sent (a statement sent with no time left would be
            # cancelled mid-flight, and the healthy connection with it).
        self._free.append(conn)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _send(self, conn: C | None, batch: _Batch[K, V], keys: list[K], deadline: float) -> None:
        """The batch's live keys as one statement, bounded by its latest caller's deadline."""
        try:
            values = await self._read(conn, keys, max(deadline - time.monotonic(), 0.0))
        except Exception as exc:  # every waiter gets the failure, each its own copy
            for _, answer, _ in batch.waiters:
                if not answer.done():
                    answer.set_exception(_copy(exc))
            return
        except BaseException:
            for _, answer, _ in batch.waiters:
                answer.cancel()
            raise
        for key, answer, _ in batch.waiters:
            if not answer.done():
                answer.set_result(values.get(key))

    async def renew(self) -> None:
        """Give back the idle lanes' connections (their next reads open fresh ones): after one died under a read,
        its siblings likely did too (a failover, terminated backends)."""
        held = [c for c in self._free if c is not None]
        self._free = [None] * len(self._free)
        for conn in held:
            await self._source.give_back(conn, False)

    async def close(self) -> None:
        """Let the batches in flight finish, then give every held connection back."""
        self._closed = True
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        held, self._free = [c for c in self._free if c is not None], []
        for conn in held:
            await self._source.give_back(conn, False)


def _copy(exc: Exception) -> Exception:
    if isinstance(exc, StoreUnavailable):
        return StoreUnavailable(*exc.args)
    return exc
