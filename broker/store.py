"""The PostgreSQL adapter (asyncpg): every SQL statement of the broker, and asyncpg errors turned into domain errors.

Every statement runs through the broker's SECURITY DEFINER functions (owned by the elevated NOLOGIN role), so the
service's login role needs no table privilege and a valid token costs one round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from broker.errors import RefreshLockTimeout, StoreUnavailable
from broker.model import AccountState, Link, RefreshedTokens, Secret
from broker.policy import ZERO_TIME, normalise_expiry

log = logging.getLogger("broker.store")
T = TypeVar("T")

GET_LINK = "SELECT * FROM token_broker.get_oidc_link($1)"
LOCK_LINK = "SELECT * FROM token_broker.lock_oidc_link($1)"
STORE_REFRESHED = "SELECT token_broker.store_refreshed($1, $2, $3, $4, $5)"
BEGIN_REFRESH = "SELECT token_broker.begin_refresh($1)"
ABANDON_REFRESH = "SELECT token_broker.abandon_refresh($1)"
PING = "SELECT 1"

#: Errors that mean "the database failed", as opposed to a bug in our SQL.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection left mid-operation by a server-side termination
)


def _translate(exc: BaseException, what: str) -> StoreUnavailable:
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        # The grants or the elevation are missing: loud, because it is a deployment error, not an outage.
        log.error("permission denied while %s: run `token-broker migrate` (%s)", what, exc)
        return StoreUnavailable(f"permission denied while {what}")
    if isinstance(exc, asyncpg.UndefinedFunctionError):
        log.error("broker functions missing while %s: run `token-broker migrate`", what)
        return StoreUnavailable(f"schema not migrated while {what}")
    return StoreUnavailable(f"database error while {what}: {type(exc).__name__}")


def _link(user_id: UUID, row: asyncpg.Record | None) -> Link | None:
    if row is None:
        return None
    return Link(
        user_id=user_id,
        access_token=Secret(row["access_token"] or ""),
        refresh_token=Secret(row["refresh_token"] or ""),
        expiry=normalise_expiry(row["expiry"]),
        account=AccountState.DISABLED if row["account_disabled"] else AccountState.ACTIVE,
        encrypted=row["access_key_id"] is not None or row["refresh_key_id"] is not None,
        in_flight_seconds=row.get("in_flight_seconds", None),
    )


PoolConnection = asyncpg.pool.PoolConnectionProxy  # what Pool.acquire() hands out


class _Locked:
    def __init__(
        self, pool: asyncpg.Pool, conn: PoolConnection, user_id: UUID, link: Link | None, timeout: float
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._user_id = user_id
        self.link = link
        self._timeout = timeout

    async def _autonomous(self, sql: str, what: str) -> None:
        """Run on another connection and commit now, independent of the locked transaction."""
        await _on_pool(self._pool, self._timeout, what, lambda other: other.execute(sql, self._user_id))

    async def mark_in_flight(self) -> None:
        await self._autonomous(BEGIN_REFRESH, "marking the refresh in flight")

    async def clear_in_flight(self) -> None:
        try:
            await self._autonomous(ABANDON_REFRESH, "clearing the in-flight marker")
        except StoreUnavailable:
            log.warning("in-flight marker not cleared; it expires by itself", extra={"user_id": str(self._user_id)})

    async def save(self, tokens: RefreshedTokens) -> bool:
        assert self.link is not None
        try:
            return bool(
                await self._conn.fetchval(
                    STORE_REFRESHED,
                    *_store_args(self._user_id, self.link.refresh_token, tokens),
                    timeout=self._timeout,
                )
            )
        except _DB_ERRORS as exc:
            raise _translate(exc, "writing refreshed tokens") from None


async def _on_pool(pool: asyncpg.Pool, timeout: float, what: str, op: Callable[[PoolConnection], Awaitable[T]]) -> T:
    """One statement on a pooled connection; `timeout` bounds the pool wait too, not only the query."""
    try:
        async with asyncio.timeout(timeout):
            async with pool.acquire() as conn:
                return await op(conn)
    except _DB_ERRORS as exc:
        raise _translate(exc, what) from None


def _store_args(user_id: UUID, previous: Secret, tokens: RefreshedTokens) -> tuple[Any, ...]:
    return (
        user_id,
        previous.reveal(),
        tokens.access_token.reveal(),
        tokens.refresh_token.reveal(),
        tokens.expiry or ZERO_TIME,
    )


class PostgresStore:
    """LinkStore on an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @staticmethod
    async def create_pool(dsn: str, *, min_size: int, max_size: int, connect_timeout: float) -> asyncpg.Pool:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                server_settings={"application_name": "token-broker"},
                reset=_keep_session,
            )
        except _DB_ERRORS as exc:
            raise _translate(exc, "connecting") from None
        assert pool is not None
        return pool

    async def get_link(self, user_id: UUID, *, timeout: float) -> Link | None:
        row = await _on_pool(self._pool, timeout, "reading the link", lambda conn: conn.fetchrow(GET_LINK, user_id))
        return _link(user_id, row)

    @asynccontextmanager
    async def lock_link(self, user_id: UUID, *, lock_timeout: float) -> AsyncIterator[_Locked]:
        """Hold the row lock on the user's oidc link for the block; commit on clean exit, else roll back."""
        try:
            conn = await self._pool.acquire(timeout=lock_timeout)
        except _DB_ERRORS as exc:
            raise _translate(exc, "acquiring a connection for the refresh lock") from None
        try:
            tx = conn.transaction()
            try:
                await tx.start()
                await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
                row = await conn.fetchrow(LOCK_LINK, user_id, timeout=lock_timeout + 1)
            except asyncpg.LockNotAvailableError:
                await _rollback_quietly(tx)
                raise RefreshLockTimeout(f"refresh lock not acquired within {lock_timeout}s") from None
            except _DB_ERRORS as exc:
                await _rollback_quietly(tx)
                raise _translate(exc, "taking the refresh lock") from None
            try:
                yield _Locked(self._pool, conn, user_id, _link(user_id, row), lock_timeout + 1)
            except BaseException:
                await _rollback_quietly(tx)
                raise
            try:
                await tx.commit()
            except _DB_ERRORS as exc:
                raise _translate(exc, "committing refreshed tokens") from None
        finally:
            await _release_quietly(self._pool, conn)

    async def save_refreshed(
        self, user_id: UUID, previous_refresh: Secret, tokens: RefreshedTokens, *, timeout: float
    ) -> bool:
        args = _store_args(user_id, previous_refresh, tokens)
        return bool(
            await _on_pool(
                self._pool, timeout, "writing refreshed tokens", lambda conn: conn.fetchval(STORE_REFRESHED, *args)
            )
        )

    async def ping(self, *, timeout: float) -> bool:
        try:
            await _on_pool(self._pool, timeout, "checking readiness", lambda conn: conn.fetchval(PING))
        except StoreUnavailable:
            return False
        return True

    def pool_stats(self) -> tuple[int, int]:
        """(size, in use) of the connection pool."""
        size = self._pool.get_size()
        return size, size - self._pool.get_idle_size()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo. The broker keeps no session state (no session advisory locks, LISTEN,
    cursors or plain SET; only SET LOCAL inside transactions), and asyncpg still rolls back an open transaction
    first. asyncpg's default reset query would cost a second round trip on every request."""


async def _rollback_quietly(tx: asyncpg.transaction.Transaction) -> None:
    with suppress(*_DB_ERRORS):
        await tx.rollback()


async def _release_quietly(pool: asyncpg.Pool, conn: PoolConnection) -> None:
    try:
        await pool.release(conn, timeout=5)
    except _DB_ERRORS:
        conn.terminate()
