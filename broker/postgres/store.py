"""The PostgreSQL adapter (asyncpg): every SQL statement of the broker, and asyncpg errors turned into domain errors.

Every statement runs through the broker's SECURITY DEFINER functions (owned by the elevated NOLOGIN role), so the
service's login role needs no table privilege and a valid token costs one round trip.

Every statement is bounded, the locked transaction's BEGIN, COMMIT and ROLLBACK included. A connection whose
statement timed out is terminated, never returned to the pool: asyncpg would otherwise wait for a cancel request
sent over the same (maybe silent) network path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Protocol, TypeVar
from uuid import UUID

import asyncpg

from broker.core.refresh.schedule import Note
from broker.errors import RefreshLockTimeout, StoreUnavailable
from broker.model import DbKey, Link, RefreshedTokens, Secret
from broker.postgres.codec import Codec
from broker.postgres.dbcrypt import Cipher
from broker.postgres.keepalive import watch_socket
from broker.postgres.lanes import ReadLanes
from broker.postgres.statements import LOST_STATEMENT, connection_class
from broker.telemetry.logs import UserLog

log = logging.getLogger("broker.store")
T = TypeVar("T")


class _Holder(Protocol):
    """What holds a locked transaction's connection for its block: whether a statement broke the connection."""

    broken: bool


H = TypeVar("H", bound=_Holder)

# The reads carry the rejected access token (0005) and the recorded re-auth-required state (0008); the lock carries
# the state. get_oidc_link(s) and lock_oidc_link stay for the previous release during a rolling upgrade.
GET_LINK = "SELECT * FROM token_broker.read_oidc_link($1)"
GET_LINKS = "SELECT * FROM token_broker.read_oidc_links($1)"
LOCK_LINK = "SELECT * FROM token_broker.lock_oidc_link_state($1)"
NOTE_REAUTH = "SELECT token_broker.note_reauth_required($1, $2, $3, $4, $5)"
NOTE_RECOVERED = "SELECT token_broker.note_link_recovered($1, $2, $3, $4)"
STORE_REFRESHED = "SELECT token_broker.store_refreshed($1, $2, $3, $4, $5, $6, $7, $8)"
BEGIN_REFRESH = "SELECT token_broker.begin_refresh($1, $2)"
DBCRYPT_KEYS = "SELECT * FROM token_broker.get_dbcrypt_keys()"
ABANDON_REFRESH = "SELECT token_broker.abandon_refresh($1, $2)"
HEARTBEAT = "SELECT token_broker.heartbeat_refresh($1, $2)"
NOTE_FORCED = "SELECT token_broker.note_forced_refresh($1)"
REJECT_ACCESS = "SELECT token_broker.reject_access_token($1, $2)"
NOTE_LINKS = "SELECT * FROM token_broker.note_links($1, $2, $3, $4, $5, $6, $7, $8)"
CLAIM_DUE = "SELECT * FROM token_broker.claim_due_refreshes($1, $2, $3)"
UNSCHEDULE = "SELECT token_broker.unschedule_refresh($1)"
PING = "SELECT 1"

#: Errors after which the connection is dead or in an unknown state: it is terminated, never reused.
_BROKEN: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # SQLSTATE 08: connection failure
    asyncpg.AdminShutdownError,  # pg_terminate_backend, a fast shutdown
    asyncpg.CrashShutdownError,
)

#: Errors that mean "the database failed", as opposed to a bug in our SQL.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection left mid-operation by a server-side termination
)


_LOCK_OR_LOST: tuple[type[BaseException], ...] = (asyncpg.LockNotAvailableError, *LOST_STATEMENT)


def _translate(exc: BaseException, what: str) -> StoreUnavailable:
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        # The grants or the elevation are missing: loud, because it is a deployment error, not an outage.
        log.error("permission denied while %s: run `token-broker migrate` (%s)", what, exc)
        return StoreUnavailable(f"permission denied while {what}")
    if isinstance(exc, asyncpg.UndefinedFunctionError):
        log.error("broker functions missing while %s: run `token-broker migrate`", what)
        return StoreUnavailable(f"schema not migrated while {what}")
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"database timed out while {what}")
    return StoreUnavailable(f"database error while {what}: {type(exc).__name__}")


PoolConnection = asyncpg.pool.PoolConnectionProxy  # what Pool.acquire() hands out


class _Locked:
    """A LockedLink: the row lock held by the open transaction on `conn`."""

    def __init__(self, store: PostgresStore, conn: PoolConnection, user_id: UUID, link: Link | None, timeout: float):
        self._codec = store.codec
        self._store = store
        self._conn = conn
        self._user_id = user_id
        self.link = link
        self._timeout = timeout
        self.broken = False  # a statement timed out or the transport failed: no rollback, terminate

    async def mark_in_flight(self) -> None:
        """Committed at once on another connection, independent of the locked transaction."""
        assert self.link is not None
        args = (self._user_id, self.link.refresh_token.sha256())
        await self._store.run(
            self._timeout, "marking the refresh in flight", lambda c: c.execute(BEGIN_REFRESH, *args), replayable=True
        )

    async def clear_in_flight(self) -> None:
        assert self.link is not None
        args = (self._user_id, self.link.refresh_token.sha256())
        try:
            await self._store.run(
                self._timeout, "clearing the in-flight marker", lambda c: c.execute(ABANDON_REFRESH, *args)
            )
        except StoreUnavailable:
            UserLog(log, args[0]).warning("in-flight marker not cleared; it dies with its heartbeat")

    async def note_forced(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._conn.execute(NOTE_FORCED, self._user_id)
        except _DB_ERRORS as exc:
            self.broken = not isinstance(exc, asyncpg.PostgresError)
            raise _translate(exc, "recording a forced refresh") from None

    async def note_written(self, note: Note) -> None:
        """Record, in the locked transaction, the refresh token this broker is writing (broker.refresh.background)."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._conn.execute(NOTE_LINKS, *_note_args([note], seen=False, written=True, log_after=0.0))
        except _DB_ERRORS as exc:
            self.broken = not isinstance(exc, asyncpg.PostgresError)
            raise _translate(exc, "recording the written refresh token") from None

    async def note_reauth_required(self, error: str, *, forced: bool) -> bool:
        assert self.link is not None
        args = (self._user_id, self.link.fingerprint(), error, forced, self._store.webhooks)
        return await self._fetch_in_tx(NOTE_REAUTH, args, "recording that the link needs a new login") is not None

    async def note_recovered(self, fingerprint: bytes, how: str) -> bool:
        args = (self._user_id, fingerprint, how, self._store.webhooks)
        return await self._fetch_in_tx(NOTE_RECOVERED, args, "recording that the link recovered") is not None

    async def _fetch_in_tx(self, sql: str, args: tuple[object, ...], what: str) -> object:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._conn.fetchval(sql, *args)
        except _DB_ERRORS as exc:
            self.broken = not isinstance(exc, asyncpg.PostgresError)
            raise _translate(exc, what) from None

    async def save(self, tokens: RefreshedTokens) -> bool:
        assert self.link is not None
        args = self._codec.store_args(self._user_id, self.link, tokens)
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._conn.fetchval(STORE_REFRESHED, *args))
        except _DB_ERRORS as exc:
            self.broken = not isinstance(exc, asyncpg.PostgresError)
            raise _translate(exc, "writing refreshed tokens") from None


class PostgresStore:
    """LinkStore on an asyncpg pool. Reads of links run on a few connections held from the pool (broker.reads:
    one statement per read, batched only when every read connection is busy, never older than the request)."""

    def __init__(
        self, pool: asyncpg.Pool, cipher: Cipher | None = None, *, read_connections: int = 2, webhooks: bool = False
    ) -> None:
        self._pool = pool
        self.webhooks = webhooks  # events are written pending for the webhook (one is configured)
        self.codec = Codec(cipher)
        self._reads: ReadLanes[PoolConnection, UUID, asyncpg.Record] = ReadLanes(
            self, _fetch_links, _reusable, lanes=read_connections
        )

    @staticmethod
    async def create_pool(
        dsn: str, *, min_size: int, max_size: int, connect_timeout: float, statement_cache: bool = True
    ) -> asyncpg.Pool:
        """The pool. Without the statement cache every statement is an unnamed prepared statement, which PgBouncer
        in transaction pooling accepts (named ones would meet another client's server connection). With it, the
        first statement such a pooler loses turns the cache off (broker.pgstatements)."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                server_settings={"application_name": "token-broker"},
                reset=_keep_session,
                init=watch_socket,
                statement_cache_size=100 if statement_cache else 0,
                connection_class=connection_class(statement_cache),
            )
        except _DB_ERRORS as exc:
            raise _translate(exc, "connecting") from None
        assert pool is not None
        return pool

    async def run(
        self,
        timeout: float,
        what: str,
        op: Callable[[PoolConnection], Awaitable[T]],
        *,
        idempotent: bool = False,
        replayable: bool = False,
    ) -> T:
        """One statement on a pooled connection; `timeout` bounds the pool waits and the statements together. A
        connection whose statement failed at the transport or timed out is terminated, not reused. An idempotent
        statement whose connection died under it (a killed backend) is tried once more on a fresh connection.

        `replayable`: a statement that did not run because a pooler lost its prepared statement is tried once more
        (without the cache by then). Only for the steps before a refresh token goes to the IdP: the statements after
        it (the write of the rotated tokens, lifting the marker) are never replayed here; their failure takes the
        path every store failure takes there (the write-back's compare-and-set, the marker's heartbeat)."""
        deadline = time.monotonic() + timeout
        try:
            return await self._run_once(deadline, op)
        except LOST_STATEMENT as exc:
            if not replayable or time.monotonic() >= deadline:
                raise _translate(exc, what) from None
            try:
                return await self._run_once(deadline, op)
            except _DB_ERRORS as again:
                raise _translate(again, what) from None
        except _BROKEN as exc:
            if not idempotent or isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                raise _translate(exc, what) from None
            log.info("connection died while %s (%s); trying once more on a fresh one", what, type(exc).__name__)
            # Its siblings are likely dead too (a failover, backends terminated): replace every pooled connection
            # as it is next used, so that the retry runs on a new one.
            await self._pool.expire_connections()
            try:
                return await self._run_once(deadline, op)
            except _DB_ERRORS as again:
                raise _translate(again, what) from None
        except _DB_ERRORS as exc:
            raise _translate(exc, what) from None

    async def _run_once(self, deadline: float, op: Callable[[PoolConnection], Awaitable[T]]) -> T:
        async with asyncio.timeout_at(_loop_deadline(deadline)):
            conn = await self._pool.acquire()
        broken = False
        try:
            async with asyncio.timeout_at(_loop_deadline(deadline)):
                return await op(conn)
        except _BROKEN:
            broken = True
            raise
        finally:
            await self._give_back(conn, broken)

    async def get_link(self, user_id: UUID, *, timeout: float) -> Link | None:
        deadline = time.monotonic() + timeout
        try:
            row = await self._reads.get(user_id, timeout)
        except LOST_STATEMENT as exc:
            # The read did not run (a pooler lost its prepared statement): once more, without the cache by then.
            if time.monotonic() >= deadline:
                raise _translate(exc, "reading the link") from None
            try:
                row = await self._reads.get(user_id, deadline - time.monotonic())
            except _DB_ERRORS as again:
                raise _translate(again, "reading the link") from None
        except _BROKEN as exc:
            if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                raise _translate(exc, "reading the link") from None
            log.info("connection died while reading the link (%s); trying once more", type(exc).__name__)
            # A failover or terminated backends: the siblings are likely dead too. Idle read connections and pooled
            # ones are replaced; the retry runs on a fresh connection from the pool.
            await self._reads.renew()
            await self._pool.expire_connections()
            row = await self.run(
                deadline - time.monotonic(),
                "reading the link",
                lambda c: c.fetchrow(GET_LINK, user_id),
                replayable=True,
            )
        except _DB_ERRORS as exc:
            raise _translate(exc, "reading the link") from None
        return self.codec.link(user_id, row)

    async def acquire(self) -> PoolConnection:
        """A connection for a read lane (ConnectionSource)."""
        return await self._pool.acquire()

    async def give_back(self, conn: PoolConnection, broken: bool) -> None:
        await self._give_back(conn, broken)

    async def close(self) -> None:
        """Give the read connections back to the pool (before the pool closes)."""
        await self._reads.close()

    @asynccontextmanager
    async def lock_link(self, user_id: UUID, *, lock_timeout: float, hold_timeout: float) -> AsyncIterator[_Locked]:
        """Hold the row lock on the user's oidc link for the block; commit on clean exit, else roll back.

        `lock_timeout` bounds the wait for the lock (and each statement); `hold_timeout` is how long the
        transaction may stay open, enforced by the server too (idle_in_transaction_session_timeout)."""
        async with self.locked_transaction(
            LOCK_LINK,
            (user_id,),
            lambda conn, row, statement: _Locked(self, conn, user_id, self.codec.link(user_id, row), statement),
            lock_timeout=lock_timeout,
            hold_timeout=hold_timeout,
            lock="refresh lock",
            commit="committing refreshed tokens",
        ) as locked:
            yield locked

    @asynccontextmanager
    async def locked_transaction(
        self,
        sql: str,
        args: Sequence[object],
        holder: Callable[[PoolConnection, asyncpg.Record | None, float], H],
        *,
        lock_timeout: float,
        hold_timeout: float,
        lock: str,
        commit: str,
    ) -> AsyncIterator[H]:
        """A transaction whose first statement `sql` takes a lock (and reads what it guards), held for the block:
        committed on clean exit, else rolled back. `holder(conn, row, statement_timeout)` wraps the connection for
        the block; its `broken` says whether a statement in it left the connection unusable. Every statement,
        BEGIN and COMMIT included, is bounded; a connection whose statement timed out is terminated, never reused.
        The refresh lock and the exchange lock share it."""
        statement = lock_timeout + 1
        try:
            conn, tx, row = await self._begin_locked(sql, args, lock_timeout, hold_timeout, lock)
        except LOST_STATEMENT:
            # Nothing ran and nothing was sent yet (a pooler lost the prepared statement): take the lock once more,
            # without the cache by then.
            try:
                conn, tx, row = await self._begin_locked(sql, args, lock_timeout, hold_timeout, lock)
            except LOST_STATEMENT as exc:
                raise _translate(exc, f"taking the {lock}") from None
        broken = True  # until the transaction ended cleanly
        try:
            held = holder(conn, row, statement)
            try:
                yield held
            except BaseException:
                broken = held.broken or not await _rollback(tx, statement)
                raise
            try:
                async with asyncio.timeout(statement):
                    await tx.commit()
            except _DB_ERRORS as exc:
                raise _translate(exc, commit) from None
            broken = False
        finally:
            await self._give_back(conn, broken)

    async def _begin_locked(
        self, sql: str, args: Sequence[object], lock_timeout: float, hold_timeout: float, lock: str
    ) -> tuple[PoolConnection, asyncpg.transaction.Transaction, asyncpg.Record | None]:
        """A connection, its transaction begun with its timeouts, and `sql` run in it (its row: None when there is
        none). On failure the connection is given back, and the error is the domain's, except a lost prepared
        statement, raised as is."""
        try:
            async with asyncio.timeout(lock_timeout):
                conn = await self._pool.acquire()
        except _DB_ERRORS as exc:
            raise _translate(exc, f"acquiring a connection for the {lock}") from None
        statement = lock_timeout + 1
        tx = conn.transaction()
        try:
            async with asyncio.timeout(statement):
                await tx.start()
                await conn.execute(
                    f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms';"
                    f" SET LOCAL statement_timeout = '{int(statement * 1000)}ms';"
                    f" SET LOCAL idle_in_transaction_session_timeout = '{int(hold_timeout * 1000)}ms'"
                )
                row = await conn.fetchrow(sql, *args)
        except _LOCK_OR_LOST as exc:
            await self._give_back(conn, not await _rollback(tx, statement))
            if isinstance(exc, asyncpg.LockNotAvailableError):
                raise RefreshLockTimeout(f"{lock} not acquired within {lock_timeout}s") from None
            raise
        except BaseException as exc:
            await self._give_back(conn, True)
            if isinstance(exc, _DB_ERRORS):
                raise _translate(exc, f"taking the {lock}") from None
            raise
        return conn, tx, row

    async def dbcrypt_keys(self, *, timeout: float) -> list[DbKey]:
        rows = await self.run(
            timeout, "reading dbcrypt_keys", lambda c: c.fetch(DBCRYPT_KEYS), idempotent=True, replayable=True
        )
        return [DbKey(r["active_key_digest"], r["revoked_key_digest"], r["test"]) for r in rows]

    async def save_refreshed(self, previous: Link, tokens: RefreshedTokens, *, timeout: float) -> bool:
        args = self.codec.store_args(previous.user_id, previous, tokens)
        return bool(await self.run(timeout, "writing refreshed tokens", lambda c: c.fetchval(STORE_REFRESHED, *args)))

    async def heartbeat(self, held: Sequence[tuple[UUID, Secret]], *, timeout: float) -> None:
        ids = [uid for uid, _ in held]
        hashes = [token.sha256() for _, token in held]
        await self.run(timeout, "refreshing in-flight heartbeats", lambda c: c.execute(HEARTBEAT, ids, hashes))

    async def remember_rejected(self, user_id: UUID, access_sha256: bytes, *, timeout: float) -> None:
        await self.run(
            timeout,
            "remembering a rejected token",
            lambda c: c.execute(REJECT_ACCESS, user_id, access_sha256),
            idempotent=True,
        )

    async def note_reauth_required(self, link: Link, error: str, *, forced: bool, timeout: float) -> bool:
        args = (link.user_id, link.fingerprint(), error, forced, self.webhooks)
        found = await self.run(
            timeout, "recording that the link needs a new login", lambda c: c.fetchval(NOTE_REAUTH, *args)
        )
        return found is not None

    async def note_recovered(self, user_id: UUID, fingerprint: bytes, how: str, *, timeout: float) -> bool:
        args = (user_id, fingerprint, how, self.webhooks)
        found = await self.run(
            timeout, "recording that the link recovered", lambda c: c.fetchval(NOTE_RECOVERED, *args)
        )
        return found is not None

    async def ping(self, *, timeout: float) -> bool:
        try:
            await self.run(timeout, "checking readiness", lambda conn: conn.fetchval(PING), replayable=True)
        except StoreUnavailable:
            return False
        return True

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    def pool_stats(self) -> tuple[int, int]:
        """(size, in use) of the connection pool."""
        size = self._pool.get_size()
        return size, size - self._pool.get_idle_size()

    async def _give_back(self, conn: PoolConnection, broken: bool) -> None:
        """Return a connection to the pool; a broken one is terminated first (it is never reused). Errors of the
        release itself are swallowed here: they must not replace the error that is on its way to the caller."""
        if broken:
            with suppress(Exception):
                conn.terminate()
        try:
            async with asyncio.timeout(1.0):
                await self._pool.release(conn)
        except Exception:
            with suppress(Exception):
                conn.terminate()


async def _fetch_links(conn: PoolConnection, user_ids: list[UUID]) -> dict[UUID, asyncpg.Record]:
    if len(user_ids) == 1:
        row = await conn.fetchrow(GET_LINK, user_ids[0])
        return {} if row is None else {user_ids[0]: row}
    return {row["user_id"]: row for row in await conn.fetch(GET_LINKS, user_ids)}


def _reusable(exc: BaseException) -> bool:
    """Whether a read connection is still fine after `exc`: an SQL error, yes; the transport, a timeout or a
    cancellation mid-statement, no."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _BROKEN)


def _loop_deadline(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock (asyncio.timeout_at)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo. The broker keeps no session state (no session advisory locks, LISTEN,
    cursors or plain SET; only SET LOCAL inside transactions), and asyncpg still rolls back an open transaction
    first. asyncpg's default reset query would cost a second round trip on every request."""


async def _rollback(tx: asyncpg.transaction.Transaction, timeout: float) -> bool:
    """Roll back within `timeout`; False when that failed (the connection must then not be reused)."""
    try:
        async with asyncio.timeout(timeout):
            await tx.rollback()
    except _DB_ERRORS:
        return False
    return True


class PostgresSchedule:
    """ScheduleStore (broker.refresh.schedule) on the store's pool: active users, due background refreshes, and the
    refresh token a broker last wrote or saw, in token_broker.refresh_schedule."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def note(
        self, notes: Sequence[Note], *, seen: bool, log_after: float, timeout: float
    ) -> list[tuple[UUID, bool]]:
        args = _note_args(notes, seen=seen, written=False, log_after=log_after)
        rows = await self._store.run(timeout, "noting active users", lambda c: c.fetch(NOTE_LINKS, *args))
        return [(r["user_id"], bool(r["first_in_window"])) for r in rows]

    async def claim_due(
        self, limit: int, *, claim_seconds: float, active_seconds: float, timeout: float
    ) -> list[tuple[UUID, bytes | None]]:
        rows = await self._store.run(
            timeout, "claiming due refreshes", lambda c: c.fetch(CLAIM_DUE, limit, claim_seconds, active_seconds)
        )
        return [(r["user_id"], r["refresh_sha256"]) for r in rows]

    async def unschedule(self, user_id: UUID, *, timeout: float) -> None:
        await self._store.run(timeout, "unscheduling a refresh", lambda c: c.execute(UNSCHEDULE, user_id))

    async def note_written(self, note: Note, *, timeout: float) -> None:
        args = _note_args([note], seen=False, written=True, log_after=0.0)
        await self._store.run(timeout, "recording the written refresh token", lambda c: c.execute(NOTE_LINKS, *args))


def _note_args(notes: Sequence[Note], *, seen: bool, written: bool, log_after: float) -> tuple[object, ...]:
    return (
        [n.user_id for n in notes],
        [n.refresh_sha256 for n in notes],
        [n.expiry for n in notes],
        [n.ahead_seconds for n in notes],
        [n.lifetime_seconds for n in notes],
        seen,
        written,
        log_after,
    )
