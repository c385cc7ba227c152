"""Migrations and the RBAC elevation, proven by connecting as each role and trying each statement."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from broker.postgres.migrate import migrate
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import broker_env, running_broker
from tests.support.idp import OidcTestProvider
from tests.support.pg import SERVICE_ROLE, Database, DatabaseFactory

CATALOG_SNAPSHOT = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), null, null FROM pg_constraint
WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), null, null FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'index', indexname, indexdef, null, null FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1, 2
"""


async def _snapshot(db: Database) -> list[tuple[object, ...]]:
    conn = await db.admin()
    try:
        return [tuple(r) for r in await conn.fetch(CATALOG_SNAPSHOT)]
    finally:
        await conn.close()


async def test_migrate_twice_is_idempotent(databases: DatabaseFactory) -> None:
    db = await databases.create("empty")
    first = await migrate(db.admin_url, SERVICE_ROLE)
    snap = await _snapshot(db)
    second = await migrate(db.admin_url, SERVICE_ROLE)
    assert first.applied == [
        "0001_links.sql",
        "0002_refresh_in_flight.sql",
        "0003_marker_heartbeat.sql",
        "0004_forced_refresh.sql",
        "0005_rejected_access.sql",
        "0006_refresh_schedule.sql",
        "0007_exchanged_tokens.sql",
        "0008_link_events.sql",
    ]
    assert second.applied == []
    assert second.already_applied == 8
    assert await _snapshot(db) == snap


async def test_concurrent_migrations_wait_for_each_other(databases: DatabaseFactory) -> None:
    db = await databases.create("empty")
    reports = await asyncio.gather(*(migrate(db.admin_url, SERVICE_ROLE) for _ in range(4)))
    assert sorted(len(r.applied) for r in reports) == [0, 0, 0, 8]


async def test_migrate_on_the_products_database_leaves_its_tables_alone(databases: DatabaseFactory) -> None:
    db = await databases.create("empty")
    from tests.support.pg import FIXTURES

    conn = await db.admin()
    await conn.execute((FIXTURES / "product-schema.sql").read_text())
    await conn.close()
    before = await _snapshot(db)
    await migrate(db.admin_url, SERVICE_ROLE)
    await migrate(db.admin_url, SERVICE_ROLE)
    assert await _snapshot(db) == before


async def test_the_product_schema_fixture_matches_shared_reference() -> None:
    from pathlib import Path

    from tests.support.pg import FIXTURES

    shared = Path(__file__).resolve().parents[3] / "shared" / "reference" / "product-schema.sql"
    if not shared.exists():
        pytest.skip("shared/reference is not beside this checkout")
    assert (FIXTURES / "product-schema.sql").read_text() == shared.read_text()


async def test_refresh_on_the_products_database_passes_its_trigger(product_db: Database, idp: OidcTestProvider) -> None:
    uid = uuid.uuid4()
    await product_db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'a@example.com', 'a')", uid)
    issued = await idp.login(f"user-{uid}")
    await product_db.insert_link(uid, issued.access_token, issued.refresh_token, datetime.now(UTC) - timedelta(1))
    async with running_broker(broker_env(product_db, idp)) as b:
        r = await b.get(uid)
    assert r.status == pb.TOKEN_STATUS_REFRESHED
    row = await product_db.link(uid)
    assert row is not None
    assert row["oauth_access_token"] == r.access_token


# -- the privilege matrix -----------------------------------------------------------------------------------------

LOGIN_ROLE_DENIED = [
    "SELECT * FROM user_links",
    "SELECT oauth_access_token FROM user_links",
    "UPDATE user_links SET oauth_access_token = 'x'",
    "INSERT INTO user_links (user_id, login_type) VALUES (gen_random_uuid(), 'oidc')",
    "DELETE FROM user_links",
    "SELECT * FROM users",
    "UPDATE users SET status = 'active'",
    "SELECT * FROM dbcrypt_keys",
    "SELECT * FROM token_broker.schema_migrations",
    "SELECT * FROM token_broker.refresh_in_flight",
    "DELETE FROM token_broker.refresh_in_flight",
]

ELEVATED_DENIED = [
    "SELECT linked_id FROM user_links",
    "SELECT claims FROM user_links",
    "SELECT * FROM user_links",
    "UPDATE user_links SET claims = '{}'",
    "UPDATE user_links SET linked_id = 'x'",
    "UPDATE user_links SET login_type = 'password'",
    "INSERT INTO user_links (user_id, login_type) VALUES (gen_random_uuid(), 'oidc')",
    "DELETE FROM user_links",
    "SELECT email FROM users",
    "SELECT hashed_password FROM users",
    "UPDATE users SET deleted = true",
    "SELECT * FROM dbcrypt_keys",
]

ELEVATED_ALLOWED = [
    "SELECT user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry, oauth_access_token_key_id,"
    " oauth_refresh_token_key_id FROM user_links",
    "UPDATE user_links SET oauth_access_token = oauth_access_token, oauth_refresh_token = oauth_refresh_token,"
    " oauth_expiry = oauth_expiry WHERE false",
    "SELECT id, status, deleted FROM users",
]


async def _as_role(db: Database, role: str | None, sql: str) -> None:
    """Run `sql` on the service role's connection, optionally after SET ROLE (as a superuser would)."""
    url = db.service_url if role is None else db.admin_url
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            if role is not None:
                await conn.execute(f"SET LOCAL ROLE {role}")
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize("sql", LOGIN_ROLE_DENIED)
async def test_login_role_cannot_touch_tables(product_db: Database, sql: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_role(product_db, None, sql)


@pytest.mark.parametrize("sql", ELEVATED_DENIED)
async def test_elevated_role_cannot_go_beyond_its_columns(product_db: Database, sql: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_role(product_db, "token_broker_elevated", sql)


@pytest.mark.parametrize("sql", ELEVATED_ALLOWED)
async def test_elevated_role_can_use_its_columns(product_db: Database, sql: str) -> None:
    await _as_role(product_db, "token_broker_elevated", sql)


async def test_login_role_cannot_set_role_to_elevated(product_db: Database) -> None:
    conn = await asyncpg.connect(product_db.service_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET ROLE token_broker_elevated")
    finally:
        await conn.close()


async def test_elevated_role_cannot_log_in(product_db: Database) -> None:
    from tests.support.pg import with_database

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(with_database(product_db.admin_url, product_db.name, user="token_broker_elevated"))


async def test_functions_are_not_executable_by_public(product_db: Database) -> None:
    row = await product_db.fetchrow(
        "SELECT bool_or(has_function_privilege('public', p.oid, 'EXECUTE')) AS any_public,"
        " bool_and(p.prosecdef) AS all_definer, bool_and(pg_get_userbyid(p.proowner) = 'token_broker_elevated') AS"
        " owned FROM pg_proc p WHERE p.pronamespace = 'token_broker'::regnamespace"
    )
    assert row is not None
    assert (row["any_public"], row["all_definer"], row["owned"]) == (False, True, True)


@pytest.mark.parametrize(
    "weaken",
    [
        "ALTER FUNCTION token_broker.get_oidc_link(uuid) SECURITY INVOKER;"
        " ALTER FUNCTION token_broker.get_oidc_links(uuid[]) SECURITY INVOKER;"
        " ALTER FUNCTION token_broker.read_oidc_link(uuid) SECURITY INVOKER;"
        " ALTER FUNCTION token_broker.read_oidc_links(uuid[]) SECURITY INVOKER",
        "ALTER FUNCTION token_broker.get_oidc_link(uuid) OWNER TO {service};"
        " ALTER FUNCTION token_broker.get_oidc_links(uuid[]) OWNER TO {service};"
        " ALTER FUNCTION token_broker.read_oidc_link(uuid) OWNER TO {service};"
        " ALTER FUNCTION token_broker.read_oidc_links(uuid[]) OWNER TO {service}",
        "REVOKE SELECT ON user_links FROM token_broker_elevated",
    ],
)
async def test_without_the_elevation_reads_fail_with_permission_denied(product_db: Database, weaken: str) -> None:
    """Removing or weakening the elevation must break the broker loudly, not silently serve."""
    uid = uuid.uuid4()
    await product_db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'b@example.com', 'b')", uid)
    await product_db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))
    await product_db.execute(weaken.format(service=SERVICE_ROLE))
    conn = await asyncpg.connect(product_db.service_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetchrow("SELECT * FROM token_broker.get_oidc_link($1)", uid)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetchrow("SELECT * FROM token_broker.get_oidc_links($1)", [uid])
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetchrow("SELECT * FROM token_broker.read_oidc_link($1)", uid)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetchrow("SELECT * FROM token_broker.read_oidc_links($1)", [uid])
    finally:
        await conn.close()
    async with running_broker(broker_env(product_db)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_STORE_UNAVAILABLE, "")


async def test_dbcrypt_encrypted_links_are_not_served_as_tokens(product_db: Database) -> None:
    """Ciphertext from the product's dbcrypt is never handed out as a bearer token."""
    uid = uuid.uuid4()
    await product_db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'c@example.com', 'c')", uid)
    await product_db.execute("INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (1, 'k1', 't')")
    await product_db.insert_link(uid, "ciphertext-blob", "ciphertext-refresh", datetime.now(UTC) + timedelta(hours=1))
    await product_db.execute(
        "UPDATE user_links SET oauth_access_token_key_id = 'k1', oauth_refresh_token_key_id = 'k1' WHERE user_id = $1",
        uid,
    )
    async with running_broker(broker_env(product_db)) as b:
        r = await b.get(uid)
    assert (r.status, r.access_token) == (pb.TOKEN_STATUS_STORE_UNAVAILABLE, "")


async def test_a_valid_token_costs_one_database_round_trip(db: Database) -> None:
    """Counted by PostgreSQL itself: every statement outside a transaction block commits once (pg_stat_database).
    Two broker runs, 1 call and 201 calls; their difference is what 200 valid-token calls cost."""
    uid = uuid.uuid4()
    await db.insert_link(uid, "tok", "ref", datetime.now(UTC) + timedelta(hours=1))

    async def commits() -> int:
        conn = await db.admin()
        try:
            return int(await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", db.name))
        finally:
            await conn.close()

    async def run(calls: int) -> int:
        before = await commits()
        env = broker_env(db, BROKER_HEALTH_INTERVAL="3600", BROKER_DB_POOL_MIN="1", BROKER_DB_POOL_MAX="3")
        async with running_broker(env) as b:
            for _ in range(calls):
                assert (await b.get(uid)).status == pb.TOKEN_STATUS_VALID
        for _ in range(50):  # a backend flushes its statistics when it exits
            await asyncio.sleep(0.1)
            after = await commits()
            if after - before >= calls:
                break
        await asyncio.sleep(0.3)
        return await commits() - before

    one, many = await run(1), await run(201)
    # A second round trip per call (asyncpg's default pool reset query, SET LOCAL ROLE...) would add 200 or more.
    assert 195 <= many - one <= 205, (one, many)


async def test_migrate_bounds_the_service_roles_transactions(db: Database) -> None:
    row = await db.fetchrow(
        "SELECT setconfig FROM pg_db_role_setting WHERE setrole = $1::regrole AND setdatabase = 0", SERVICE_ROLE
    )
    assert row is not None
    assert {"idle_in_transaction_session_timeout=60s", "statement_timeout=30s"} <= set(row["setconfig"])
