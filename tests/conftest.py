"""Shared fixtures: a real PostgreSQL (per-test databases), the real test IdP, and helpers to run the broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.idp import OidcTestProvider
from tests.support.mcp import McpStandIn
from tests.support.pg import Database, DatabaseFactory, PgServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def databases(pg_server: PgServer) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(pg_server)
    yield factory
    await factory.drop_all()


@pytest.fixture
async def db(databases: DatabaseFactory) -> Database:
    """A fresh, migrated database whose tables the broker created."""
    return await databases.create("plain")


@pytest.fixture
async def product_db(databases: DatabaseFactory) -> Database:
    """A fresh database with the Go product's schema (users, FKs, trigger), then migrated."""
    return await databases.create("product")


@pytest.fixture(scope="session")
def idp_server() -> Iterator[OidcTestProvider]:
    server = OidcTestProvider()
    yield server
    server.close()


@pytest.fixture
def idp(idp_server: OidcTestProvider) -> Iterator[OidcTestProvider]:
    """The session's IdP with faults cleared before and after the test; compare stats() deltas."""
    idp_server.set_fault("ok")
    yield idp_server
    idp_server.set_fault("ok")


@pytest.fixture(scope="session")
def mcp(idp_server: OidcTestProvider) -> Iterator[McpStandIn]:
    """An MCP-server stand-in that accepts only tokens the test IdP issued for it (by its JWKS)."""
    server = McpStandIn(idp_server)
    yield server
    server.close()
