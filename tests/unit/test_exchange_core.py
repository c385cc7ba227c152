"""The exchange use case on in-memory fakes: the cases the real IdP and database do not stage on cue (a token with
no known lifetime, a cache write that fails after the IdP answered, an outage while a cached token is still valid)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import cast

from broker.core.circuit import CircuitBreaker
from broker.core.exchange import ExchangeService, GuardedExchanger
from broker.core.interfaces import ExchangeKey, NullObserver
from broker.core.refresh.settings import RefreshSettings
from broker.core.resources import ResourceEntry
from broker.core.tokens import TokenService
from broker.errors import IdpUnavailable, StoreUnavailable
from broker.model import CachedExchange, ExchangedToken, Link, Secret, TokenResult, TokenStatus

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ENTRY = ResourceEntry("https://mcp.example.com/mcp", callers=frozenset({"token:chat"}))
SETTINGS = RefreshSettings(
    leeway=timedelta(seconds=600),
    refresh_ahead=timedelta(0),
    lock_timeout=1.0,
    idp_timeout=1.0,
    reauth_backoff=60.0,
    forced_interval=30.0,
    persist_warn_after=5.0,
    store_timeout=1.0,
    max_concurrent=4,
)


@dataclass
class Login:
    token: str = "login-1"

    async def get_token(self, user_id: uuid.UUID, budget: float, rejected: bytes | None = None) -> TokenResult:
        return TokenResult(TokenStatus.VALID, Secret(self.token), NOW + timedelta(hours=1))

    async def answer(
        self, user_id: uuid.UUID, link: Link | None, deadline: float, rejected: bytes | None = None
    ) -> TokenResult:
        return await self.get_token(user_id, 5.0, rejected)


@dataclass
class Store:
    rows: dict[tuple[uuid.UUID, ExchangeKey], CachedExchange] = field(default_factory=dict)
    fail_save: bool = False

    async def get_link_and_exchanged(
        self, user_id: uuid.UUID, key: ExchangeKey, *, timeout: float
    ) -> tuple[Link | None, CachedExchange | None]:
        link = Link(user_id, Secret("login"), Secret("refresh"), NOW + timedelta(hours=1))  # the Login stub decides
        return link, self.rows.get((user_id, key))

    @asynccontextmanager
    async def lock_exchanged(
        self, user_id: uuid.UUID, key: ExchangeKey, *, lock_timeout: float, hold_timeout: float
    ) -> AsyncIterator[Locked]:
        yield Locked(self, (user_id, key), self.rows.get((user_id, key)))


@dataclass
class Locked:
    store: Store
    at: tuple[uuid.UUID, ExchangeKey]
    cached: CachedExchange | None

    async def save(self, subject_sha256: bytes, token: ExchangedToken, *, forced: bool) -> None:
        if self.store.fail_save:
            raise StoreUnavailable("database timed out while caching an exchanged token")
        lifetime = (token.expiry - NOW).total_seconds() if token.expiry else None
        self.store.rows[self.at] = CachedExchange(token.access_token, token.expiry, lifetime, subject_sha256)

    async def deny(self, subject_sha256: bytes, seconds: float, error: str) -> None:
        self.store.rows[self.at] = CachedExchange(Secret(""), None, None, subject_sha256, denied_seconds=seconds)


@dataclass
class Idp:
    lifetime: timedelta | None = timedelta(minutes=5)
    down: bool = False
    calls: int = 0

    async def exchange(self, subject: Secret, resource: str, audience: str, scope: str) -> ExchangedToken:
        self.calls += 1
        if self.down:
            raise IdpUnavailable("identity provider answered HTTP 503")
        return ExchangedToken(Secret(f"bound-{self.calls}"), NOW + self.lifetime if self.lifetime else None)


def service(store: Store, idp: Idp, login: Login | None = None) -> ExchangeService:
    breaker = CircuitBreaker(5, 15.0)
    guarded = GuardedExchanger(idp, breaker, NullObserver())
    tokens = cast(TokenService, login or Login())
    return ExchangeService(tokens, store, guarded, SETTINGS, clock=lambda: NOW)


async def test_a_token_of_unknown_lifetime_is_answered_but_not_cached() -> None:
    store, idp = Store(), Idp(lifetime=None)
    svc = service(store, idp)
    uid = uuid.uuid4()
    first = await svc.get_token(uid, ENTRY, 5.0)
    second = await svc.get_token(uid, ENTRY, 5.0)
    assert (first.status, first.access_token.reveal(), first.expiry) == (TokenStatus.REFRESHED, "bound-1", None)
    assert second.access_token.reveal() == "bound-2"
    assert not store.rows


async def test_a_cached_token_of_another_login_is_never_served() -> None:
    store, idp, login = Store(), Idp(), Login()
    svc = service(store, idp, login)
    uid = uuid.uuid4()
    assert (await svc.get_token(uid, ENTRY, 5.0)).access_token.reveal() == "bound-1"
    assert (await svc.get_token(uid, ENTRY, 5.0)).status is TokenStatus.VALID
    login.token = "login-2"  # a new login, or a refresh
    again = await svc.get_token(uid, ENTRY, 5.0)
    assert (again.status, again.access_token.reveal()) == (TokenStatus.REFRESHED, "bound-2")


async def test_a_failed_cache_write_still_answers_the_exchanged_token() -> None:
    store, idp = Store(fail_save=True), Idp()
    result = await service(store, idp).get_token(uuid.uuid4(), ENTRY, 5.0)
    assert (result.status, result.access_token.reveal()) == (TokenStatus.REFRESHED, "bound-1")


async def test_an_outage_answers_the_cached_token_while_valid_and_never_the_login_token() -> None:
    store, idp = Store(), Idp(lifetime=timedelta(minutes=5))
    svc = service(store, idp)
    uid, other = uuid.uuid4(), uuid.uuid4()
    await svc.get_token(uid, ENTRY, 5.0)
    (key,) = store.rows
    store.rows[key] = replace(store.rows[key], lifetime_seconds=3600.0)  # inside the leeway: due for a new one
    idp.down = True
    fallback = await svc.get_token(uid, ENTRY, 5.0)
    nothing = await svc.get_token(other, ENTRY, 5.0)
    assert (fallback.status, fallback.access_token.reveal()) == (TokenStatus.VALID, "bound-1")
    assert fallback.failure is TokenStatus.IDP_UNAVAILABLE
    assert (nothing.status, nothing.access_token.reveal()) == (TokenStatus.IDP_UNAVAILABLE, "")
