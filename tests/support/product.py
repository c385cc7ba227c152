"""A stand-in of the Go product's own two refreshers of `user_links`, as the product does it today.

- API-key validation: when the stored OIDC token has expired, refresh inline;
- workspace builds: refresh when the token expires within the product's window (10 minutes in production).

Both read the row, call the IdP's token endpoint with the stored refresh token, and write back with a plain `UPDATE`
of the row: no lock, no in-flight marker, no compare-and-set. It connects as the product does (the database owner,
asyncpg straight at `public.user_links`), and talks to the same IdP and OAuth client as the brokers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import httpx2

from tests.support.idp import CLIENT_ID, CLIENT_SECRET

ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)

READ = "SELECT oauth_refresh_token, oauth_expiry FROM user_links WHERE user_id = $1 AND login_type = 'oidc'::login_type"
WRITE = (
    "UPDATE user_links SET oauth_access_token = $2, oauth_refresh_token = $3, oauth_expiry = $4"
    " WHERE user_id = $1 AND login_type = 'oidc'::login_type"
)


@dataclass
class ProductCounts:
    """What the product saw: refreshes it made by path, and refreshes the IdP refused (the user is logged out)."""

    api_key_refreshes: int = 0
    build_refreshes: int = 0
    refused: dict[UUID, int] = field(default_factory=dict)


class ProductRefreshers:
    """The product's two refresh paths against one database and one IdP token endpoint."""

    def __init__(self, pool: asyncpg.Pool, token_url: str, window: timedelta) -> None:
        self._pool = pool
        self._token_url = token_url
        self._window = window
        self._http = httpx2.AsyncClient(timeout=10)
        self.counts = ProductCounts()

    @staticmethod
    async def open(dsn: str, token_url: str, window: timedelta) -> ProductRefreshers:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10, server_settings={"application_name": "product"})
        assert pool is not None
        return ProductRefreshers(pool, token_url, window)

    async def close(self) -> None:
        await self._http.aclose()
        await self._pool.close()

    async def login(self, user_id: UUID, access: str, refresh: str, expires_in: int) -> None:
        """A user who logged in with OIDC: the `users` row and the link, as the product writes them at login."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO users (id, email, username) VALUES ($1, $2, 'u')", user_id, f"{user_id}@x")
            await conn.execute(
                "INSERT INTO user_links (user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry)"
                " VALUES ($1, 'oidc', $2, $3, $4)",
                user_id,
                access,
                refresh,
                datetime.now(UTC) + timedelta(seconds=expires_in),
            )

    async def validate_api_key(self, user_id: UUID) -> None:
        """The API-key middleware: an expired OIDC token is refreshed inline."""
        if await self._refresh_if(user_id, timedelta(0)):
            self.counts.api_key_refreshes += 1

    async def build(self, user_id: UUID) -> None:
        """A workspace build: the token is refreshed when it expires within the window."""
        if await self._refresh_if(user_id, self._window):
            self.counts.build_refreshes += 1

    async def _refresh_if(self, user_id: UUID, window: timedelta) -> bool:
        row = await self._pool.fetchrow(READ, user_id)
        if row is None or not row["oauth_refresh_token"]:
            return False
        expiry: datetime = row["oauth_expiry"]
        if expiry <= ZERO_TIME or datetime.now(UTC) < expiry - window:
            return False
        r = await self._http.post(
            self._token_url,
            data={"grant_type": "refresh_token", "refresh_token": row["oauth_refresh_token"]},
            auth=(CLIENT_ID, CLIENT_SECRET),
        )
        if r.status_code != 200:
            self.counts.refused[user_id] = self.counts.refused.get(user_id, 0) + 1
            return False
        body = r.json()
        new_expiry = datetime.now(UTC) + timedelta(seconds=int(body["expires_in"]))
        await self._pool.execute(WRITE, user_id, body["access_token"], body["refresh_token"], new_expiry)
        return True
