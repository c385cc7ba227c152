"""A real PostgreSQL for the tests: BROKER_TEST_DATABASE_URL, else 127.0.0.1:5432 if it answers, else embedded.

Each test gets its own database, cloned from a migrated template, so tests run in any order.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from broker.postgres.embedded import EmbeddedPostgres
from broker.postgres.migrate import migrate

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SERVICE_ROLE = "token_broker"


def with_database(url: str, database: str, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        host = netloc.rsplit("@", 1)[-1]
        netloc = f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, parts.fragment))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class PgServer:
    """The server the suite runs against; `admin_url` is a superuser DSN."""

    def __init__(self) -> None:
        self.embedded: EmbeddedPostgres | None = None
        url = os.environ.get("BROKER_TEST_DATABASE_URL")
        if url:
            self.admin_url, self.kind = url, "env"
        elif os.environ.get("BROKER_TEST_EMBEDDED") != "1" and _reachable("127.0.0.1", 5432):
            self.admin_url, self.kind = "postgresql://postgres@127.0.0.1:5432/postgres", "local"
        else:
            self.embedded = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="tb-pg-")) / "data").start()
            self.admin_url, self.kind = self.embedded.url(), "embedded"

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


@dataclass
class Database:
    """One test database: the admin DSN (superuser), and the service role's DSN (what the broker uses)."""

    name: str
    admin_url: str
    service_url: str

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_url)

    async def execute(self, sql: str, *args: object) -> str:
        conn = await self.admin()
        try:
            return str(await conn.execute(sql, *args))
        finally:
            await conn.close()

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        conn = await self.admin()
        try:
            return await conn.fetchrow(sql, *args)
        finally:
            await conn.close()

    async def insert_link(
        self,
        user_id: uuid.UUID,
        access: str,
        refresh: str,
        expiry: datetime | None,
        login_type: str = "oidc",
    ) -> None:
        await self.execute(
            "INSERT INTO user_links (user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry)"
            " VALUES ($1, $2, $3, $4, COALESCE($5, '0001-01-01 00:00:00+00'::timestamptz))",
            user_id,
            login_type,
            access,
            refresh,
            expiry,
        )

    async def set_reachable(self, reachable: bool) -> None:
        """Make the database refuse (False) or accept (True) connections; existing sessions are terminated."""
        conn = await asyncpg.connect(with_database(self.admin_url, "postgres"))
        try:
            await conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
            if not reachable:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", self.name
                )
        finally:
            await conn.close()

    async def expire(self, user_id: uuid.UUID) -> None:
        """Make the stored token expired (a minute ago), keeping its tokens."""
        await self.execute(
            "UPDATE user_links SET oauth_expiry = now() - interval '1 minute' WHERE user_id = $1", user_id
        )

    async def link(self, user_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.fetchrow("SELECT * FROM user_links WHERE user_id = $1 AND login_type = 'oidc'", user_id)

    async def marker(self, user_id: uuid.UUID) -> asyncpg.Record | None:
        """The user's in-flight marker (token_broker.refresh_in_flight), None when there is none."""
        return await self.fetchrow("SELECT * FROM token_broker.refresh_in_flight WHERE user_id = $1", user_id)

    async def change_link_state(self, user_id: uuid.UUID, count: int = 1, *, webhook: bool = False) -> None:
        """`count` state changes of the user's link as the broker writes them, as the service role (a new
        fingerprint each time: after the first, a recovery and a new re-auth-required); `webhook`: pending for it."""
        conn = await asyncpg.connect(self.service_url)
        try:
            for _ in range(count):
                await conn.execute(
                    "SELECT token_broker.note_reauth_required($1, $2, 'invalid_grant', false, $3)",
                    user_id,
                    os.urandom(32),
                    webhook,
                )
        finally:
            await conn.close()


class DatabaseFactory:
    """Creates per-test databases from templates: plain (broker-created tables) and the Go product's schema."""

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self._templates: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self.created: list[str] = []

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.server.admin_url)

    async def _template(self, flavour: str) -> str:
        async with self._lock:
            if flavour in self._templates:
                return self._templates[flavour]
            name = f"tb_tpl_{flavour}_{uuid.uuid4().hex[:8]}"
            conn = await self._admin()
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            url = with_database(self.server.admin_url, name)
            if flavour == "product":
                c = await asyncpg.connect(url)
                try:
                    await c.execute((FIXTURES / "product-schema.sql").read_text())
                finally:
                    await c.close()
            if flavour != "empty":
                await migrate(url, SERVICE_ROLE)
            self._templates[flavour] = name
            self.created.append(name)
            return name

    async def create(self, flavour: str = "plain") -> Database:
        template = await self._template(flavour)
        name = f"tb_{uuid.uuid4().hex[:12]}"
        conn = await self._admin()
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()
        self.created.append(name)
        return Database(
            name=name,
            admin_url=with_database(self.server.admin_url, name),
            service_url=with_database(self.server.admin_url, name, user=SERVICE_ROLE),
        )

    async def drop_all(self) -> None:
        conn = await self._admin()
        try:
            for name in reversed(self.created):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
