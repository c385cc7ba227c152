"""A rolling upgrade runs the previous release's pods against the new schema (0008 and its functions): every
statement the previous release sends still works as it expects, with the columns it reads, on the broker's own
tables and on the product's schema, also for a link the new release has recorded as needing a new login."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.support.pg import Database, DatabaseFactory

# The previous release's statements, as its broker/store.py sends them (token-broker 0.1.0, before link events).
GET_LINK = "SELECT * FROM token_broker.get_oidc_link($1)"
GET_LINKS = "SELECT * FROM token_broker.get_oidc_links($1)"
LOCK_LINK = "SELECT * FROM token_broker.lock_oidc_link($1)"
STORE_REFRESHED = "SELECT token_broker.store_refreshed($1, $2, $3, $4, $5, $6, $7, $8)"
BEGIN_REFRESH = "SELECT token_broker.begin_refresh($1, $2)"
DBCRYPT_KEYS = "SELECT * FROM token_broker.get_dbcrypt_keys()"
ABANDON_REFRESH = "SELECT token_broker.abandon_refresh($1, $2)"
HEARTBEAT = "SELECT token_broker.heartbeat_refresh($1, $2)"
NOTE_FORCED = "SELECT token_broker.note_forced_refresh($1)"

#: The columns the previous release's codec reads from each.
READ_COLUMNS = ["access_token", "refresh_token", "expiry", "access_key_id", "refresh_key_id", "account_disabled"]
LOCK_COLUMNS = [*READ_COLUMNS, "marker_sha256", "marker_idle_seconds", "forced_seconds_ago"]


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@pytest.mark.parametrize("flavour", ["plain", "product"])
async def test_the_previous_release_runs_against_the_new_schema(databases: DatabaseFactory, flavour: str) -> None:
    db: Database = await databases.create(flavour)
    uid = uuid.uuid4()
    if flavour == "product":
        await db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'u@example.com', 'u')", uid)
    await db.insert_link(uid, "old-access", "old-refresh", datetime.now(UTC) - timedelta(minutes=1))
    conn = await asyncpg.connect(db.service_url)
    try:
        # The new release recorded the link as needing a new login: the old one never looks, and must not break.
        assert await conn.fetchval(
            "SELECT token_broker.note_reauth_required($1, $2, 'invalid_grant', false, true)", uid, b"fp"
        )
        row = await conn.fetchrow(GET_LINK, uid)
        assert row is not None
        assert list(row.keys()) == READ_COLUMNS
        assert (row["access_token"], row["refresh_token"], row["account_disabled"]) == (
            "old-access",
            "old-refresh",
            False,
        )
        rows = await conn.fetch(GET_LINKS, [uid, uuid.uuid4()])
        assert [list(r.keys()) for r in rows] == [["user_id", *READ_COLUMNS]]
        await conn.execute(BEGIN_REFRESH, uid, sha("old-refresh"))
        await conn.execute(HEARTBEAT, [uid], [sha("old-refresh")])
        async with conn.transaction():
            locked = await conn.fetchrow(LOCK_LINK, uid)
            assert locked is not None
            assert list(locked.keys()) == LOCK_COLUMNS
            assert locked["marker_sha256"] == sha("old-refresh")
            expiry = datetime.now(UTC) + timedelta(hours=1)
            ok = await conn.fetchval(
                STORE_REFRESHED, uid, "old-refresh", "new-access", "new-refresh", expiry, None, None, sha("old-refresh")
            )
            assert ok is True
            await conn.execute(NOTE_FORCED, uid)
        await conn.execute(ABANDON_REFRESH, uid, sha("new-refresh"))
        assert await conn.fetch(DBCRYPT_KEYS) == []
        after = await conn.fetchrow(GET_LINK, uid)
        assert after is not None
        assert (after["access_token"], after["refresh_token"]) == ("new-access", "new-refresh")
        # And the new release, reading after the old one refreshed, sees a link whose tokens changed: it recovers.
        assert await conn.fetchval("SELECT token_broker.note_link_recovered($1, $2, 'login', true)", uid, b"fp")
    finally:
        await conn.close()
    types = await db.fetchrow("SELECT array_agg(type ORDER BY id) AS t FROM token_broker.link_events")
    assert types is not None
    assert types["t"] == ["link.reauth_required", "link.recovered"]


async def test_the_service_role_reaches_the_new_tables_only_through_the_functions(db: Database) -> None:
    conn = await asyncpg.connect(db.service_url)
    try:
        for table in ("link_state", "link_events", "link_events_pruned", "webhook_endpoint"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM token_broker.{table}")  # noqa: S608 - fixed names
    finally:
        await conn.close()
    definer = await db.fetchrow(
        "SELECT bool_and(p.prosecdef) AND bool_and(r.rolname = 'token_broker_elevated') AS ok"
        " FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'token_broker' AND p.proname = ANY($1)",
        [
            "note_reauth_required",
            "note_link_recovered",
            "claim_link_events",
            "settle_link_event",
            "read_link_events",
            "link_events_bounds",
            "prune_link_events",
            "link_events_backlog",
            "register_webhook_endpoint",
            "stop_webhook_endpoint",
            "read_oidc_link",
            "read_oidc_links",
            "lock_oidc_link_state",
        ],
    )
    assert definer is not None
    assert definer["ok"] is True
