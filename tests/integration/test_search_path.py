"""Search-path hijacks: objects planted in public by the service role never run as the elevated role or the admin.

The attacker is the broker's own login role with CREATE on public (the default up to PostgreSQL 14, and kept by
upgraded clusters). Every planted object writes `current_user` into a table, so the tests see who ran it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from broker.errors import MigrationRefused
from broker.postgres.migrate import migrate
from tests.support.pg import SERVICE_ROLE, Database

PLANT = """
CREATE TABLE public.hijack_log (who text NOT NULL, what text NOT NULL);
GRANT ALL ON public.hijack_log TO PUBLIC;

-- A "better match" than pg_catalog's anyenum = anyenum, so unqualified `login_type = 'oidc'` picks it.
CREATE FUNCTION public.hijack_eq(a login_type, b login_type) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'operator');
    RETURN true;  -- every row matches: another user's github link would be returned too
END $$;
CREATE OPERATOR public.= (LEFTARG = login_type, RIGHTARG = login_type, FUNCTION = public.hijack_eq);
GRANT EXECUTE ON FUNCTION public.hijack_eq(login_type, login_type) TO PUBLIC;

-- A "better match" than pg_catalog.format(text, VARIADIC "any") for format('...', some_text).
CREATE FUNCTION public.format(f text, a text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.hijack_log VALUES (current_user, 'format');
    RETURN pg_catalog.format(f, a);
END $$;
GRANT EXECUTE ON FUNCTION public.format(text, text) TO PUBLIC;
"""


async def _plant(db: Database) -> None:
    await db.execute(f"GRANT CREATE ON SCHEMA public TO {SERVICE_ROLE}")
    conn = await asyncpg.connect(db.service_url)
    try:
        await conn.execute(PLANT)
        # The trap is armed: the service role's own unqualified comparison runs the planted operator.
        assert await conn.fetchval("SELECT 'oidc'::login_type = 'github'::login_type") is True
    finally:
        await conn.close()
    await db.execute("DELETE FROM public.hijack_log")


async def _who_ran(db: Database) -> list[tuple[str, str]]:
    conn = await db.admin()
    try:
        return [(r["who"], r["what"]) for r in await conn.fetch("SELECT who, what FROM public.hijack_log")]
    finally:
        await conn.close()


async def _user_with_two_links(db: Database) -> uuid.UUID:
    uid = uuid.uuid4()
    await db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'v@example.com', 'v')", uid)
    await db.insert_link(uid, "oidc-access", "oidc-refresh", datetime.now(UTC) + timedelta(hours=1))
    await db.insert_link(uid, "github-access", "github-refresh", None, login_type="github")
    return uid


async def test_planted_operator_never_runs_as_the_elevated_role(product_db: Database) -> None:
    uid = await _user_with_two_links(product_db)
    await _plant(product_db)
    conn = await asyncpg.connect(product_db.service_url)
    try:
        rows = await conn.fetch("SELECT * FROM token_broker.get_oidc_link($1)", uid)
        assert [r["access_token"] for r in rows] == ["oidc-access"]
        batch = await conn.fetch("SELECT * FROM token_broker.get_oidc_links($1)", [uid, uuid.uuid4()])
        assert [(r["user_id"], r["access_token"]) for r in batch] == [(uid, "oidc-access")]
        async with conn.transaction():
            locked = await conn.fetch("SELECT * FROM token_broker.lock_oidc_link($1)", uid)
            assert [r["access_token"] for r in locked] == ["oidc-access"]
        await conn.execute("SELECT token_broker.begin_refresh($1, sha256('oidc-refresh'))", uid)
        stored = await conn.fetchval(
            "SELECT token_broker.store_refreshed($1, 'oidc-refresh', 'new-access', 'new-refresh', now(), NULL, NULL,"
            " sha256('oidc-refresh'))",
            uid,
        )
        assert stored is True
        await conn.execute("SELECT token_broker.abandon_refresh($1, sha256('new-refresh'))", uid)
    finally:
        await conn.close()
    assert await _who_ran(product_db) == []
    conn = await product_db.admin()
    try:  # the test's own check must not run the planted operator either
        tokens = await conn.fetch(
            "SELECT login_type::text AS kind, oauth_access_token FROM user_links"
            " WHERE user_id OPERATOR(pg_catalog.=) $1 ORDER BY 1",
            uid,
        )
    finally:
        await conn.close()
    pairs = [(r["kind"], r["oauth_access_token"]) for r in tokens]
    assert pairs == [("github", "github-access"), ("oidc", "new-access")]


async def test_planted_function_never_runs_as_the_admin_at_migrate(product_db: Database) -> None:
    await _plant(product_db)
    await migrate(product_db.admin_url, SERVICE_ROLE)
    assert await _who_ran(product_db) == []


async def test_migrate_revokes_create_on_public_from_the_service_role(product_db: Database) -> None:
    await product_db.execute(f"GRANT CREATE ON SCHEMA public TO {SERVICE_ROLE}")
    await migrate(product_db.admin_url, SERVICE_ROLE)
    row = await product_db.fetchrow("SELECT has_schema_privilege($1, 'public', 'CREATE') AS can", SERVICE_ROLE)
    assert row is not None
    assert row["can"] is False


async def test_migrate_refuses_while_everyone_may_create_in_public(product_db: Database) -> None:
    """The pre-15 default, kept by upgraded clusters: revoking from the service role alone would change nothing."""
    await product_db.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    with pytest.raises(MigrationRefused, match=r"can still CREATE in schema public.*REVOKE CREATE ON SCHEMA public"):
        await migrate(product_db.admin_url, SERVICE_ROLE)


async def test_functions_resolve_nothing_outside_pg_catalog_first(product_db: Database) -> None:
    """Every SECURITY DEFINER function pins its search_path with pg_catalog first; only store_refreshed has public
    (after pg_catalog), for the product's trigger."""
    conn = await product_db.admin()
    try:
        rows = await conn.fetch(
            "SELECT p.proname, p.proconfig FROM pg_proc p WHERE p.pronamespace = 'token_broker'::regnamespace"
        )
    finally:
        await conn.close()
    paths = {r["proname"]: r["proconfig"] for r in rows}
    expected = {name: ["search_path=pg_catalog, pg_temp"] for name in paths}
    expected["store_refreshed"] = ["search_path=pg_catalog, public, pg_temp"]
    for read in ("get_oidc_link", "get_oidc_links", "read_oidc_link", "read_oidc_links"):  # one generic plan
        expected[read] = [*expected[read], "plan_cache_mode=force_generic_plan"]
    assert paths == expected
