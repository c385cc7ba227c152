"""Rolling upgrade (#24): pods of the previous release keep running against the schema this release migrates, so
every function the previous release calls must still exist with the same arguments and result columns. The calls
below are the previous release's statements exactly as its broker/postgres/store.py sends them (captured when 0007
was added); they run here as the service role against a database migrated by this release."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.support.pg import Database

#: (statement, what the previous release reads from its rows). Never edit an entry: add the next release's calls.
PREVIOUS_RELEASE_READS = {
    "SELECT * FROM token_broker.get_oidc_link($1)": [
        "access_token", "refresh_token", "expiry", "access_key_id", "refresh_key_id", "account_disabled",
    ],
    "SELECT * FROM token_broker.get_oidc_links($1)": [
        "user_id", "access_token", "refresh_token", "expiry", "access_key_id", "refresh_key_id", "account_disabled",
    ],
    "SELECT * FROM token_broker.lock_oidc_link($1)": [
        "access_token", "refresh_token", "expiry", "access_key_id", "refresh_key_id", "account_disabled",
        "marker_sha256", "marker_idle_seconds", "forced_seconds_ago",
    ],
    "SELECT * FROM token_broker.get_dbcrypt_keys()": ["active_key_digest", "revoked_key_digest", "test"],
}  # fmt: skip
STORE_REFRESHED = "SELECT token_broker.store_refreshed($1, $2, $3, $4, $5, $6, $7, $8)"
BEGIN_REFRESH = "SELECT token_broker.begin_refresh($1, $2)"
ABANDON_REFRESH = "SELECT token_broker.abandon_refresh($1, $2)"
HEARTBEAT = "SELECT token_broker.heartbeat_refresh($1, $2)"
NOTE_FORCED = "SELECT token_broker.note_forced_refresh($1)"


async def test_the_previous_release_calls_work_against_this_schema(db: Database) -> None:
    uid = uuid.uuid4()
    expiry = datetime.now(UTC) + timedelta(hours=1)
    await db.insert_link(uid, "old-access", "old-refresh", expiry)
    sent = hashlib.sha256(b"old-refresh").digest()
    conn = await asyncpg.connect(db.service_url)
    try:
        args = {"get_oidc_links": ([uid],), "get_dbcrypt_keys": ()}
        for sql, columns in PREVIOUS_RELEASE_READS.items():
            name = sql.split("token_broker.")[1].split("(")[0]
            async with conn.transaction():
                rows = await conn.fetch(sql, *args.get(name, (uid,)))
            if name != "get_dbcrypt_keys":
                assert len(rows) == 1, sql
                assert list(rows[0].keys()) == columns, sql
        async with conn.transaction():
            await conn.fetch("SELECT * FROM token_broker.lock_oidc_link($1)", uid)
            await conn.execute(BEGIN_REFRESH, uid, sent)
            await conn.execute(HEARTBEAT, [uid], [sent])
            await conn.execute(NOTE_FORCED, uid)
            wrote = await conn.fetchval(
                STORE_REFRESHED, uid, "old-refresh", "new-access", "new-refresh", expiry, None, None, sent
            )
            await conn.execute(ABANDON_REFRESH, uid, sent)
        assert wrote is True
    finally:
        await conn.close()
    row = await db.link(uid)
    assert row is not None
    assert (row["oauth_access_token"], row["oauth_refresh_token"]) == ("new-access", "new-refresh")
