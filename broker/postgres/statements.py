"""Prepared statements on the broker's pooled connections: named uniquely per pool, and asyncpg's statement cache
turned off by itself when a connection pooler loses them.

Behind PgBouncer in transaction pooling without prepared-statement support (1.20 and older), a statement asyncpg
prepared and cached on one server connection is later bound on another: "prepared statement does not exist", or
"already exists" when a name is prepared again. Such a statement never ran. The first one turns the cache off for the
whole pool, once, with a WARNING naming BROKER_DB_STATEMENT_CACHE; each connection drops its cache before its next
statement, and from then on every statement is unnamed, as with `statement_cache_size=0`.

asyncpg names statements `__asyncpg_stmt_<n>__`, n counting from 1 in every process, so behind such a pooler a name
may meet another process's statement of the same name (another worker, another replica, a previous pod) and run
that statement instead of ours, with our arguments. Names here carry a random prefix per pool, so they never repeat.

asyncpg has no public hook for either; this overrides three of its private methods (pinned: asyncpg < 0.33).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from typing import Any

import asyncpg

log = logging.getLogger("broker.store")

#: The errors of a prepared statement a pooler lost (or met under the same name): the statement did not run.
LOST_STATEMENT: tuple[type[asyncpg.PostgresError], ...] = (
    asyncpg.InvalidSQLStatementNameError,  # 26000 prepared statement "..." does not exist
    asyncpg.DuplicatePreparedStatementError,  # 42P05 prepared statement "..." already exists
)


class StatementCache:
    """One pool's switch: whether connections cache prepared statements; and the names they give them."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)

    def name(self, kind: str) -> str:
        return f"__tb_{kind}_{self._prefix}_{next(self._ids):x}__"

    def lost(self, exc: BaseException) -> None:
        """A statement was lost by a pooler: the cache goes off for good (logged once)."""
        if not self.enabled:
            return
        self.enabled = False
        log.warning(
            "a prepared statement was lost between transactions (%s): the database is reached through a pooler in "
            "transaction pooling without prepared-statement support, such as PgBouncer 1.20 or older. asyncpg's "
            "statement cache is now off in this process, and the statement is tried again where that is safe; set "
            "BROKER_DB_STATEMENT_CACHE=false to start that way",
            type(exc).__name__,
        )


class _Connection(asyncpg.Connection):
    """asyncpg's connection with the pool's StatementCache (a class attribute of the subclass made per pool)."""

    statements: StatementCache
    _stmt_cache: Any  # asyncpg's private statement LRU (not in the stubs)
    _stmt_cache_enabled: bool

    def _get_unique_id(self, prefix: str) -> str:
        return self.statements.name(prefix)

    async def _get_statement(self, query: str, timeout: float | None, **kwargs: Any) -> Any:
        if self._stmt_cache_enabled and not self.statements.enabled:
            # Evicted statements are closed on the server by asyncpg at its next prepare (a Close of a name a server
            # connection does not have is no error); what is prepared from now on is unnamed.
            self._stmt_cache_enabled = False
            self._stmt_cache.set_max_size(0)
        return await super()._get_statement(query, timeout, **kwargs)  # type: ignore[misc]  # private, unstubbed

    async def _do_execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._do_execute(*args, **kwargs)  # type: ignore[misc]  # private, unstubbed
        except LOST_STATEMENT as exc:
            self.statements.lost(exc)
            raise


def connection_class(cache: bool) -> type[asyncpg.Connection]:
    """A connection class for one pool, with its own StatementCache (`cache`: whether it starts on)."""
    return type("BrokerConnection", (_Connection,), {"statements": StatementCache(cache)})
