"""The elevated role that owns the SECURITY DEFINER functions (#21): `migrate` refuses one that can log in or that
another role reaches (exit 2, with the fix), a non-superuser administrator can migrate, and `serve` stays unready
until the role is fixed.

Roles belong to the whole cluster, not to a database, so these tests run on a PostgreSQL of their own (the embedded
one, 18; and the system's 15 when installed): the shared server's roles are every other test's."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.errors import MigrationRefused
from broker.postgres.embedded import EmbeddedPostgres
from broker.postgres.migrate import migrate
from broker.v1 import token_broker_pb2 as pb
from tests.support.broker import ROOT, broker_env, running_broker
from tests.support.pg import Database

SERVICE = "token_broker"
ELEVATED = "token_broker_elevated"
SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module", params=["embedded", "system-15"])
def cluster(request: pytest.FixtureRequest) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="tb-roles-")) / "data")
    if request.param == "system-15":
        if not (SYSTEM_PG15 / "initdb").exists():
            pytest.skip("PostgreSQL 15's server binaries are not installed")
        pg.bin = SYSTEM_PG15
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@dataclass
class Fresh:
    """A new database on the test's cluster; the roles the test creates are dropped afterwards."""

    pg: EmbeddedPostgres
    name: str = field(default_factory=lambda: f"tb_{uuid.uuid4().hex[:10]}")

    def url(self, user: str = "postgres") -> str:
        return self.pg.url(self.name, user)

    async def sql(self, statement: str, database: str | None = None) -> None:
        conn = await asyncpg.connect(self.pg.url(database or self.name))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def database(self) -> Database:
        return Database(self.name, self.url(), self.url(SERVICE))


@pytest.fixture
async def fresh(cluster: EmbeddedPostgres) -> AsyncIterator[Fresh]:
    f = Fresh(cluster)
    await f.sql(f'CREATE DATABASE "{f.name}"', "postgres")
    try:
        yield f
    finally:
        await f.sql(f'DROP DATABASE "{f.name}" WITH (FORCE)', "postgres")
        conn = await asyncpg.connect(cluster.url())
        try:
            roles = await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> 'postgres'"
                " ORDER BY rolname <> $1",  # the elevated role first: its memberships go with it
                ELEVATED,
            )
            for (role,) in roles:
                await conn.execute(f'DROP ROLE "{role}"')
        finally:
            await conn.close()


async def test_migrate_refuses_an_elevated_role_that_can_log_in(fresh: Fresh) -> None:
    await fresh.sql(f"CREATE ROLE {ELEVATED} LOGIN PASSWORD 'x'")
    env = {**os.environ, "BROKER_DATABASE_URL": fresh.url(SERVICE), "BROKER_MIGRATE_DATABASE_URL": fresh.url()}
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "broker", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert f"ALTER ROLE {ELEVATED} NOLOGIN" in r.stderr
    assert "Traceback" not in r.stderr
    conn = await asyncpg.connect(fresh.url())
    try:  # one transaction: nothing of the refused migration stays
        assert await conn.fetchval("SELECT to_regclass('token_broker.schema_migrations')") is None
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("setup", "fixes"),
    [
        # The service role a member, directly.
        ([f"CREATE ROLE {SERVICE} LOGIN", f"GRANT {ELEVATED} TO {SERVICE}"], [f"REVOKE {ELEVATED} FROM {SERVICE}"]),
        # Through a group role; the group is a member too.
        (
            [
                "CREATE ROLE app_group NOLOGIN",
                f"GRANT {ELEVATED} TO app_group",
                f"CREATE ROLE {SERVICE} LOGIN IN ROLE app_group",
            ],
            [f"take {SERVICE} out of app_group", f"REVOKE {ELEVATED} FROM app_group"],
        ),
        # Any other role that is a member.
        (["CREATE ROLE reporting LOGIN", f"GRANT {ELEVATED} TO reporting"], [f"REVOKE {ELEVATED} FROM reporting"]),
        # A service role that is a superuser reaches every role.
        ([f"CREATE ROLE {SERVICE} LOGIN SUPERUSER"], [f"ALTER ROLE {SERVICE} NOSUPERUSER"]),
    ],
)
async def test_migrate_refuses_an_elevated_role_that_another_role_reaches(
    fresh: Fresh, setup: list[str], fixes: list[str]
) -> None:
    await fresh.sql(f"CREATE ROLE {ELEVATED} NOLOGIN")
    for statement in setup:
        await fresh.sql(statement)
    with pytest.raises(MigrationRefused) as refused:
        await migrate(fresh.url(), SERVICE)
    for fix in fixes:
        assert fix in str(refused.value)


async def test_a_non_superuser_administrator_migrates_and_the_broker_serves(fresh: Fresh) -> None:
    """CREATEROLE and owner of the database, nothing more: it becomes a member of the elevated role (allowed: it is
    the migrating role), migrates twice, and the broker serves."""
    await fresh.sql("CREATE ROLE tb_admin LOGIN CREATEROLE")
    await fresh.sql(f'ALTER DATABASE "{fresh.name}" OWNER TO tb_admin')
    await migrate(fresh.url("tb_admin"), SERVICE)
    again = await migrate(fresh.url("tb_admin"), SERVICE)
    assert again.applied == []
    with pytest.raises(MigrationRefused, match=f"tb_admin is a member of {ELEVATED}"):
        await migrate(fresh.url(), SERVICE)  # a superuser now: the administrator is another role's member
    db = fresh.database()
    uid = uuid.uuid4()
    await db.insert_link(uid, "admin-migrated-token", "r", datetime.now(UTC) + timedelta(hours=1))
    async with running_broker(broker_env(db)) as b:
        await _wait_serving(b.target, True)
        assert (await b.get(uid)).access_token == "admin-migrated-token"


async def test_an_administrator_that_cannot_join_a_pre_created_role_is_told_what_to_run(fresh: Fresh) -> None:
    """The elevated role created beforehand by a superuser: on PostgreSQL 16 and later an administrator holds no
    ADMIN OPTION on a role it did not create, so it cannot make itself a member; migrate says what a superuser runs
    (on 15, CREATEROLE may grant any role that is not a superuser, and migrate does it itself)."""
    await fresh.sql(f"CREATE ROLE {ELEVATED} NOLOGIN")
    await fresh.sql("CREATE ROLE tb_admin LOGIN CREATEROLE")
    await fresh.sql(f'ALTER DATABASE "{fresh.name}" OWNER TO tb_admin')
    conn = await asyncpg.connect(fresh.url())
    try:
        modern = int(await conn.fetchval("SHOW server_version_num")) >= 160000
    finally:
        await conn.close()
    if modern:
        grant = f"GRANT {ELEVATED} TO tb_admin WITH INHERIT TRUE, SET TRUE"
        with pytest.raises(MigrationRefused) as refused:
            await migrate(fresh.url("tb_admin"), SERVICE)
        assert f"as a superuser, run {grant}" in str(refused.value)
        await fresh.sql(grant)
    report = await migrate(fresh.url("tb_admin"), SERVICE)
    assert "0001_links.sql" in report.applied


async def _wait_serving(target: str, serving: bool, timeout: float = 20.0) -> None:
    want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            r = await stub.Check(health_pb2.HealthCheckRequest(service="broker.v1.TokenBroker"), timeout=2)
            if r.status == want:
                return
            assert time.monotonic() < deadline, f"readiness never became {serving}"
            await asyncio.sleep(0.1)


async def test_serve_is_not_ready_while_the_elevated_role_is_unsafe(
    fresh: Fresh, caplog: pytest.LogCaptureFixture
) -> None:
    """A member added after migrate: the broker starts, says at ERROR what to fix, stays NOT_SERVING, and becomes
    ready once it is fixed."""
    await migrate(fresh.url(), SERVICE)
    await fresh.sql("CREATE ROLE reporting LOGIN")
    await fresh.sql(f"GRANT {ELEVATED} TO reporting")
    await fresh.sql(f"ALTER ROLE {ELEVATED} LOGIN")
    db = fresh.database()
    with caplog.at_level(logging.INFO, logger="broker.app"):
        async with running_broker(broker_env(db)) as b:
            deadline = time.monotonic() + 20
            while not any("elevated database role is unsafe" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no ERROR about the elevated role"
                await asyncio.sleep(0.1)
            await _wait_serving(b.target, False)
            await fresh.sql(f"REVOKE {ELEVATED} FROM reporting")
            await fresh.sql(f"ALTER ROLE {ELEVATED} NOLOGIN")
            await _wait_serving(b.target, True)
            assert (await b.get(uuid.uuid4())).status == pb.TOKEN_STATUS_NO_LINK
    errors = [r for r in caplog.records if "elevated database role is unsafe" in r.getMessage()]
    assert len(errors) == 1  # once, not at every readiness probe
    assert errors[0].levelno == logging.ERROR
    assert f"REVOKE {ELEVATED} FROM reporting" in errors[0].getMessage()
    assert f"ALTER ROLE {ELEVATED} NOLOGIN" in errors[0].getMessage()
