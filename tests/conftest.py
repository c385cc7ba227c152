"""Shared fixtures: a real PostgreSQL (per-test databases), the real test IdP, and a token endpoint of the tests' own.

Where a test goes:
- tests/unit/: no sockets, no processes (`make unit`, seconds). Pure functions, and the domain through its interfaces
  (broker/core/interfaces.py) on the fakes in tests/support/fakes.py, for what the real services cannot stage on cue.
- tests/contract/: the same behavioural tests run on a fake and on the real adapter it stands for (FakeStore and
  PostgresStore, ...), so that a unit test on a fake proves what production does. A behaviour a unit test relies on
  gets a contract test; where the fake differs from the real adapter, the fake is fixed.
- tests/integration/: real services only: PostgreSQL, the oidc-provider IdP (tests/idp), the gRPC server on port 0,
  real processes. A stand-in of the tests' own (tests/support/token_endpoint.py, tests/support/stores.py) only where
  the real service cannot produce the case.
- Files are named for the behaviour they prove (test_write_back.py, test_in_flight_markers.py), never for the issue,
  review or person that asked for them. Helpers shared by files live in tests/support/, fixtures here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.idp import OidcTestProvider
from tests.support.mcp import McpStandIn
from tests.support.pg import Database, DatabaseFactory, PgServer
from tests.support.token_endpoint import TokenEndpoint


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


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    """A token endpoint of the tests' own, for the IdP answers oidc-provider cannot give on cue."""
    ep = TokenEndpoint()
    yield ep
    ep.close()


@pytest.fixture(scope="session")
def mcp(idp_server: OidcTestProvider) -> Iterator[McpStandIn]:
    """An MCP-server stand-in that accepts only tokens the test IdP issued for it (by its JWKS)."""
    server = McpStandIn(idp_server)
    yield server
    server.close()
