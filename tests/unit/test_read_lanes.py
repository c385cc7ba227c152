"""ReadLanes: a read runs at once on a free lane; when every lane is busy, requests gather in the batch that has not
been sent, and a request never joins a read already in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from broker.errors import StoreUnavailable
from broker.postgres.lanes import ReadLanes


class Conn:
    def __init__(self, n: int) -> None:
        self.n = n


class Source:
    def __init__(self) -> None:
        self.opened = 0
        self.returned: list[tuple[int, bool]] = []

    async def acquire(self) -> Conn:
        self.opened += 1
        return Conn(self.opened)

    async def give_back(self, conn: Conn, broken: bool) -> None:
        self.returned.append((conn.n, broken))


class Db:
    """Answers from `rows` as they are when a read is *sent*; reads can be held open with `gate`."""

    def __init__(self) -> None:
        self.rows: dict[str, str] = {}
        self.sent: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def fetch(self, conn: Conn, keys: list[str]) -> Mapping[str, str]:
        self.sent.append(list(keys))
        snapshot = {k: self.rows[k] for k in keys if k in self.rows}
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return snapshot


def lanes(source: Source, db: Db, n: int = 1, max_batch: int = 128) -> ReadLanes[Conn, str, str]:
    return ReadLanes(source, db.fetch, lambda exc: isinstance(exc, LookupError), lanes=n, max_batch=max_batch)


async def test_a_read_on_a_free_lane_is_sent_at_once_and_keeps_its_connection() -> None:
    source, db = Source(), Db()
    db.rows["u"] = "row-u"
    reads = lanes(source, db)
    assert await reads.get("u", 1) == "row-u"
    assert await reads.get("missing", 1) is None
    assert db.sent == [["u"], ["missing"]]
    assert source.opened == 1  # the lane holds its connection
    await reads.close()
    assert source.returned == [(1, False)]


async def test_requests_arriving_during_a_read_wait_for_the_next_batch_and_see_later_commits() -> None:
    source, db = Source(), Db()
    db.rows.update(a="old-a", b="old-b")
    db.gate = asyncio.Event()
    reads = lanes(source, db)
    first = asyncio.create_task(reads.get("a", 1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert db.sent == [["a"]]  # in flight
    db.rows.update(a="new-a", b="new-b")  # committed after the first read was sent
    later = [asyncio.create_task(reads.get(k, 1)) for k in ("a", "b", "a")]
    await asyncio.sleep(0)
    db.gate.set()
    assert await first == "old-a"
    assert [await t for t in later] == ["new-a", "new-b", "new-a"]  # one batch, read after they arrived
    assert db.sent == [["a"], ["a", "b"]]  # the same user's requests share one key
    await reads.close()


async def test_a_full_batch_starts_another() -> None:
    source, db = Source(), Db()
    db.gate = asyncio.Event()
    db.rows.update({str(i): f"r{i}" for i in range(5)})
    reads = lanes(source, db, max_batch=2)
    tasks = [asyncio.create_task(reads.get(str(i), 1)) for i in range(5)]
    await asyncio.sleep(0)
    db.gate.set()
    assert [await t for t in tasks] == [f"r{i}" for i in range(5)]
    assert db.sent == [["0"], ["1", "2"], ["3", "4"]]
    await reads.close()


async def test_a_failed_batch_fails_each_waiter_and_a_broken_connection_is_replaced() -> None:
    source, db = Source(), Db()
    db.gate = asyncio.Event()
    reads = lanes(source, db)
    first = asyncio.create_task(reads.get("a", 1))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(reads.get(k, 1)) for k in ("b", "c")]
    await asyncio.sleep(0)
    db.fail = StoreUnavailable("down")
    db.gate.set()
    for task in (first, *waiters):
        with pytest.raises(StoreUnavailable):
            await task
    errors = [w.exception() for w in waiters]
    assert errors[0] is not errors[1]  # each waiter its own exception
    assert (1, True) in source.returned  # terminated, not reused
    db.fail = None
    db.gate = None
    db.rows["a"] = "back"
    assert await reads.get("a", 1) == "back"
    assert source.opened >= 2  # a fresh connection
    await reads.close()


async def test_an_sql_error_keeps_the_connection() -> None:
    source, db = Source(), Db()
    reads = lanes(source, db)
    db.fail = LookupError("permission denied")
    with pytest.raises(LookupError):
        await reads.get("a", 1)
    db.fail = None
    assert await reads.get("a", 1) is None
    assert source.opened == 1
    assert source.returned == []
    await reads.close()


async def test_a_waiter_times_out_alone_and_the_lane_stays_usable() -> None:
    source, db = Source(), Db()
    db.gate = asyncio.Event()
    reads = lanes(source, db)
    slow = asyncio.create_task(reads.get("a", 5))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await reads.get("b", 0.01)  # waited in the next batch
    db.gate.set()
    assert await slow is None
    db.gate = None
    db.rows["c"] = "c"
    assert await reads.get("c", 1) == "c"
    await reads.close()


async def test_a_cancelled_reader_terminates_its_connection() -> None:
    source, db = Source(), Db()
    db.gate = asyncio.Event()
    reads = lanes(source, db)
    task = asyncio.create_task(reads.get("a", 5))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.returned == [(1, True)]  # state unknown mid-statement: never reused
    db.gate = None
    assert await reads.get("a", 1) is None
    await reads.close()


async def test_renew_gives_back_idle_connections_and_reads_open_fresh_ones() -> None:
    source, db = Source(), Db()
    reads = lanes(source, db, n=2)
    await asyncio.gather(reads.get("a", 1), reads.get("b", 1))  # both lanes open a connection
    opened = source.opened
    await reads.renew()
    assert sorted(source.returned) == [(n, False) for n in range(1, opened + 1)]
    assert await reads.get("a", 1) is None
    assert source.opened == opened + 1
    await reads.close()


async def test_a_batch_whose_callers_all_gave_up_is_not_sent_and_the_lane_keeps_its_connection() -> None:
    """Sending it with no time left would cancel the statement mid-flight and kill a healthy connection."""
    source, db = Source(), Db()
    db.gate = asyncio.Event()
    db.rows.update(a="row-a", d="row-d")
    reads = lanes(source, db)
    first = asyncio.create_task(reads.get("a", 5))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(reads.get("c", 5))  # a caller that went away (its RPC was cancelled)
    with pytest.raises(TimeoutError):
        await reads.get("b", 0.01)  # the same batch: it waits for the busy lane
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    db.gate.set()
    assert await first == "row-a"
    assert await reads.get("d", 1) == "row-d"  # on the free lane at once
    assert db.sent == [["a"], ["d"]]
    assert (source.opened, source.returned) == (1, [])  # one connection, never terminated
    await reads.close()


async def test_only_the_keys_still_awaited_are_sent() -> None:
    source, db = Source(), Db()
    db.gate = asyncio.Event()
    db.rows.update(a="row-a", c="row-c")
    reads = lanes(source, db)
    first = asyncio.create_task(reads.get("a", 5))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(reads.get("c", 5))
    with pytest.raises(TimeoutError):
        await reads.get("b", 0.01)
    db.gate.set()
    assert (await first, await waiting) == ("row-a", "row-c")
    assert db.sent == [["a"], ["c"]]
    await reads.close()
