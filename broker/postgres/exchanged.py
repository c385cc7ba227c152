"""The ExchangeStore adapter: tokens exchanged for one resource, in `token_broker.exchanged_tokens`, through the
elevated role's functions. The token is sealed like the links' tokens (dbcrypt when keys are configured). The lock
is a transaction-scoped advisory lock on the row's key, held across the IdP call with every statement bounded, as
the refresh lock is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

import asyncpg

from broker.core.interfaces import ExchangeKey
from broker.model import CachedExchange, ExchangedToken, Link, Secret
from broker.postgres.codec import Codec
from broker.postgres.store import _DB_ERRORS, PoolConnection, PostgresStore, _translate

GET_LINK_AND_EXCHANGED = "SELECT * FROM token_broker.get_oidc_link_exchanged($1, $2, $3, $4)"
LOCK_EXCHANGED = "SELECT * FROM token_broker.lock_exchanged_token($1, $2, $3, $4)"
STORE_EXCHANGED = "SELECT token_broker.store_exchanged_token($1, $2, $3, $4, $5, $6, $7, $8, $9)"
DENY_EXCHANGE = "SELECT token_broker.deny_exchange($1, $2, $3, $4, $5, $6, $7)"


def _cached(codec: Codec, row: asyncpg.Record | None, prefix: str = "") -> CachedExchange | None:
    """The exchange row; `prefix`: its columns' prefix where it comes joined to the link ("x_")."""
    if row is None or row[prefix + "subject_sha256"] is None:
        return None
    plain, unreadable = codec.open_value(row[prefix + "access_token"] or "", row[prefix + "access_key_id"])
    return CachedExchange(
        access_token=Secret(plain),
        expiry=row[prefix + "expiry"],
        lifetime_seconds=row[prefix + "lifetime_seconds"],
        subject_sha256=bytes(row[prefix + "subject_sha256"]),
        denied_seconds=row[prefix + "denied_seconds"],
        forced_seconds_ago=row[prefix + "forced_seconds_ago"],
        unreadable=unreadable,
    )


class _LockedExchange:
    """A LockedExchange: the key's advisory lock held by the open transaction on `conn`."""

    def __init__(
        self,
        codec: Codec,
        conn: PoolConnection,
        user_id: UUID,
        key: ExchangeKey,
        cached: CachedExchange | None,
        timeout: float,
    ) -> None:
        self._codec = codec
        self._conn = conn
        self._args = (user_id, *key)
        self.cached = cached
        self._timeout = timeout
        self.broken = False

    async def save(self, subject_sha256: bytes, token: ExchangedToken, *, forced: bool) -> None:
        stored, key_id = self._codec.seal(token.access_token)
        await self._execute(
            "caching an exchanged token", STORE_EXCHANGED, subject_sha256, stored, key_id, token.expiry, forced
        )

    async def deny(self, subject_sha256: bytes, seconds: float, error: str) -> None:
        await self._execute("remembering a refused exchange", DENY_EXCHANGE, subject_sha256, seconds, error[:200])

    async def _execute(self, what: str, sql: str, *args: object) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._conn.execute(sql, *self._args, *args)
        except _DB_ERRORS as exc:
            self.broken = not isinstance(exc, asyncpg.PostgresError)
            raise _translate(exc, what) from None


class PostgresExchangeStore:
    """ExchangeStore on the PostgresStore's pool and codec."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._codec = store.codec

    async def get_link_and_exchanged(
        self, user_id: UUID, key: ExchangeKey, *, timeout: float
    ) -> tuple[Link | None, CachedExchange | None]:
        row = await self._store.run(
            timeout,
            "reading the link and its exchanged token",
            lambda c: c.fetchrow(GET_LINK_AND_EXCHANGED, user_id, *key),
            idempotent=True,
        )
        if row is None:
            return None, None
        return self._codec.link(user_id, row), _cached(self._codec, row, "x_")

    @asynccontextmanager
    async def lock_exchanged(
        self, user_id: UUID, key: ExchangeKey, *, lock_timeout: float, hold_timeout: float
    ) -> AsyncIterator[_LockedExchange]:
        """Hold the key's lock for the block; commit on clean exit, else roll back. Bounded like the refresh lock."""
        async with self._store.locked_transaction(
            LOCK_EXCHANGED,
            (user_id, *key),
            lambda conn, row, statement: _LockedExchange(
                self._codec, conn, user_id, key, _cached(self._codec, row), statement
            ),
            lock_timeout=lock_timeout,
            hold_timeout=hold_timeout,
            lock="exchange lock",
            commit="committing an exchanged token",
        ) as locked:
            yield locked
