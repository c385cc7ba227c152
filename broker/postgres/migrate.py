"""`token-broker migrate`: applies the versioned SQL files in broker/postgres/migrations once each, then the
repeatable ones.

Safe to run from several pods at once: everything happens in one transaction under an advisory lock. On the
product's own database it only adds what the broker owns (schema token_broker, roles, grants, functions).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from broker.config import ROLE_NAME
from broker.errors import MigrationRefused, StoreUnavailable
from broker.postgres.elevated import ELEVATED, elevated_role_problems

log = logging.getLogger("broker.migrate")

#: An arbitrary constant key for pg_advisory_xact_lock, so concurrent migrations wait for each other.
MIGRATION_LOCK_KEY = 0x746F6B656E62726B  # "tokenbrk"
_VERSIONED = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

#: The migration's transaction resolves names in pg_catalog only (pg_temp last: never searched for functions or
#: operators, and this session creates no temporary objects). Every file also writes its schemas out.
_SAFE_SEARCH_PATH = "SET LOCAL search_path = pg_catalog, pg_temp"

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS token_broker;
CREATE TABLE IF NOT EXISTS token_broker.schema_migrations (
    version pg_catalog.int4 PRIMARY KEY,
    name pg_catalog.text NOT NULL,
    applied_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now()
);
"""


@dataclass(frozen=True)
class MigrationReport:
    applied: list[str]
    already_applied: int


def _files() -> tuple[list[tuple[int, str, str]], list[tuple[str, str]]]:
    versioned: list[tuple[int, str, str]] = []
    repeatable: list[tuple[str, str]] = []
    for entry in resources.files("broker.postgres.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = _VERSIONED.match(entry.name)
        if m:
            versioned.append((int(m.group(1)), entry.name, entry.read_text()))
        elif entry.name.startswith("repeatable_"):
            repeatable.append((entry.name, entry.read_text()))
    return sorted(versioned), sorted(repeatable)


async def migrate(dsn: str, service_role: str, *, timeout: float = 60.0) -> MigrationReport:
    """Apply pending migrations with the admin DSN; return what was applied."""
    if not ROLE_NAME.fullmatch(service_role):
        raise ValueError(f"BROKER_DB_SERVICE_ROLE is not a valid role name: {service_role!r}")
    versioned, repeatable = _files()
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise StoreUnavailable(f"cannot connect for migration: {type(exc).__name__}") from None
    try:
        async with conn.transaction():
            # First, so that nothing below can resolve a name to an object that someone else created in public
            # (a function, an operator or a type there would run as this admin role).
            await conn.execute(_SAFE_SEARCH_PATH)
            await conn.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(_BOOKKEEPING)
            await conn.execute("SELECT pg_catalog.set_config('token_broker.service_role', $1, true)", service_role)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM token_broker.schema_migrations")}
            applied: list[str] = []
            for version, name, sql in versioned:
                if version in done:
                    continue
                log.info("applying migration", extra={"migration": name})
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO token_broker.schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                applied.append(name)
            await _check_elevated_role(conn, service_role)
            await _own_through_elevated_role(conn)
            for _name, sql in repeatable:
                await conn.execute(sql)
        return MigrationReport(applied=applied, already_applied=len(done))
    except asyncpg.RaiseError as exc:
        # Our own refusals (repeatable_access.sql): the message and the hint are written for the operator.
        hint = f" ({exc.hint})" if exc.hint else ""
        raise MigrationRefused(f"migration refused: {exc.message}{hint}") from None
    finally:
        await conn.close()


async def _check_elevated_role(conn: asyncpg.Connection, service_role: str) -> None:
    """Refuse an elevated role that a pre-existing setup made unsafe: it is kept as it is, and is about to own every
    SECURITY DEFINER function. Only this role and superusers may be members."""
    me = await conn.fetchval("SELECT current_user")
    problems = await elevated_role_problems(conn, [service_role], allowed_members=[me])
    if problems:
        raise MigrationRefused(
            f"migration refused: the role {ELEVATED} is not safe to own the broker's functions: "
            + "; ".join(problems)
            + ". Fix it, then migrate again."
        )


async def _own_through_elevated_role(conn: asyncpg.Connection) -> None:
    """An administrator that is not a superuser (CREATEROLE, owner of the database) hands the functions to the
    elevated role, and replaces them on the next migrate, only as a member that may SET ROLE to it and inherits its
    privileges; PostgreSQL 16 and later make the role's creator a member without either."""
    if await conn.fetchval(
        "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user"
    ):
        return
    modern = int(await conn.fetchval("SELECT pg_catalog.current_setting('server_version_num')")) >= 160000
    needed = ("SET", "USAGE") if modern else ("USAGE",)
    has = [await conn.fetchval("SELECT pg_catalog.pg_has_role(current_user, $1, $2)", ELEVATED, p) for p in needed]
    if all(has):
        return
    grant = f"GRANT {ELEVATED} TO CURRENT_USER" + (" WITH INHERIT TRUE, SET TRUE" if modern else "")
    me = await conn.fetchval("SELECT current_user")
    try:
        await conn.execute(grant)
    except asyncpg.InsufficientPrivilegeError:
        raise MigrationRefused(
            f"migration refused: the migrating role {me} must be a member of {ELEVATED} to make it the functions'"
            f" owner, and cannot grant itself that: as a superuser, run {grant.replace('CURRENT_USER', me)}"
        ) from None
