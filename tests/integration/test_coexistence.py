"""The brokers beside the product's own refreshers (tests/support/product.py), against the real oidc-provider with
rotation and reuse detection, in compressed time: one second stands for one minute.

20 users are active both in chat (through two broker replicas) and in the product (API-key validations and
workspace builds) for one simulated hour. A grant the IdP revoked (a refresh token sent twice) is a user logged out;
the IdP's own `grant.revoked` events count them.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta

import pytest

from tests.support.broker import RunningBroker, broker_env, running_broker
from tests.support.idp import OidcTestProvider
from tests.support.pg import Database
from tests.support.product import ProductRefreshers

MINUTE = 1.0  # compressed time: one second of the test stands for one minute
USERS = 20
HOUR = 60 * MINUTE
IDP_LATENCY_MS = 200

#: The broker's production defaults, scaled: leeway 600 s, refresh-ahead 60 s, the product's 10-minute window.
SCALED_ENV = {
    "BROKER_REFRESH_LEEWAY": str(10 * MINUTE),
    "BROKER_REFRESH_AHEAD": str(1 * MINUTE),
    "BROKER_PRODUCT_REFRESH_WINDOW": str(10 * MINUTE),
    "BROKER_ACTIVE_WINDOW": str(60 * MINUTE),
    "BROKER_BACKGROUND_JITTER": str(1 * MINUTE),
    "BROKER_OIDC_TIMEOUT": str(1 * MINUTE),
    "BROKER_LOG_LEVEL": "WARNING",
}


@dataclass
class Outcome:
    revoked: int  # grants the IdP revoked (reuse detected): users logged out
    idp_refreshes: int
    product_refreshes: int
    broker_refreshes: int
    foreign_rotations: int
    chat_answers: dict[str, int]

    def __str__(self) -> str:
        return (
            f"{self.revoked} of {USERS} users revoked in one simulated hour; IdP refresh grants "
            f"{self.idp_refreshes} (product {self.product_refreshes}, brokers {self.broker_refreshes}); foreign "
            f"rotations counted {self.foreign_rotations}; "
            f"chat answers {self.chat_answers}"
        )


async def simulate(db: Database, token_minutes: int, *, seed: int = 22) -> Outcome:
    """One simulated hour of 20 users active in chat (two replicas) and in the product, tokens of `token_minutes`."""
    rng = random.Random(seed)
    idp = OidcTestProvider(access_ttl=int(token_minutes * MINUTE))
    # An IdP on the internet: each token request takes about 200 ms, which is how long a refresh is in flight.
    idp.set_fault("ok", delay_ms=IDP_LATENCY_MS)
    answers: dict[str, int] = {}
    try:
        async with AsyncExitStack() as stack:
            env = broker_env(db, idp, **SCALED_ENV)
            brokers = [await stack.enter_async_context(running_broker(env)) for _ in range(2)]
            product = await ProductRefreshers.open(db.admin_url, idp.token_url, timedelta(minutes=10) * MINUTE / 60)
            stack.push_async_callback(product.close)
            end = time.monotonic() + HOUR
            users = [uuid.uuid4() for _ in range(USERS)]

            async def user(uid: uuid.UUID, start: float) -> None:
                # Logins spread over one token lifetime, so the fleet's expiries are spread as in production.
                await asyncio.sleep(start)
                issued = await idp.login(f"user-{uid}")
                await product.login(uid, issued.access_token, issued.refresh_token, issued.expires_in)
                await asyncio.gather(
                    every(end, rng, 1.0, 6.0, lambda: chat(brokers[rng.randrange(2)], uid, answers)),
                    # A page of the product's UI: a few API calls at once, each validating the API key.
                    every(end, rng, 0.5, 1.5, lambda: page(product, uid)),
                    every(end, rng, 2.0, 8.0, lambda: product.build(uid)),
                )

            await asyncio.gather(*(user(u, rng.uniform(0, token_minutes * MINUTE)) for u in users))
            stats = idp.stats()
            broker_refreshes = sum(int(b.sample("token_broker_refreshes_total", result="success")) for b in brokers)
            foreign = sum(int(b.sample("token_broker_foreign_rotations_total")) for b in brokers)
            counts = product.counts
            return Outcome(
                revoked=stats["grants_revoked"],
                idp_refreshes=stats["refresh_success"],
                product_refreshes=counts.api_key_refreshes + counts.build_refreshes,
                broker_refreshes=broker_refreshes,
                foreign_rotations=foreign,
                chat_answers=answers,
            )
    finally:
        idp.close()


async def chat(b: RunningBroker, uid: uuid.UUID, answers: dict[str, int]) -> None:
    from broker.v1 import token_broker_pb2 as pb

    r = await b.get(uid)
    name = pb.TokenStatus.Name(r.status)
    answers[name] = answers.get(name, 0) + 1


async def page(product: ProductRefreshers, uid: uuid.UUID) -> None:
    await asyncio.gather(product.validate_api_key(uid), product.validate_api_key(uid))


async def every(end: float, rng: random.Random, low: float, high: float, action: object) -> None:
    """Run `action` at random intervals in [low, high) seconds until `end` (time.monotonic())."""
    assert callable(action)
    while True:
        await asyncio.sleep(rng.uniform(low, high))
        if time.monotonic() >= end:
            return
        await action()


def broker_refresh_bound(token_minutes: int) -> int:
    """The most refreshes the brokers may make in the hour if none is made before half the token's lifetime: per
    user, one per half-lifetime, plus one for the first token (its lifetime unknown until a broker refreshed it)."""
    return USERS * (int(HOUR / (token_minutes * MINUTE / 2)) + 2)


@pytest.mark.slow
async def test_30_minute_tokens_no_active_user_is_logged_out(product_db: Database) -> None:
    """30-minute tokens (the defaults' regime): every active user's token is refreshed in the background before it
    enters the product's 10-minute window, so the product never refreshes one and no grant is revoked."""
    outcome = await simulate(product_db, 30)
    print(f"30-minute tokens: {outcome}")
    assert outcome.revoked == 0, str(outcome)
    assert outcome.product_refreshes == 0, str(outcome)
    assert 0 < outcome.broker_refreshes <= broker_refresh_bound(30), str(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("token_minutes", [15, 5])
async def test_short_tokens_what_remains(product_db: Database, token_minutes: int) -> None:
    """Tokens at or under twice the product's window: a token is never refreshed before half its lifetime, so the
    product's build path still refreshes (what remains, docs/coexistence.md). Guaranteed: the brokers never refresh
    more often than every half-lifetime (never on every request), and every product rotation is counted."""
    outcome = await simulate(product_db, token_minutes)
    print(f"{token_minutes}-minute tokens: {outcome}")
    assert 0 < outcome.broker_refreshes <= broker_refresh_bound(token_minutes), str(outcome)
    assert outcome.product_refreshes > 0, str(outcome)
    assert outcome.foreign_rotations > 0, str(outcome)
