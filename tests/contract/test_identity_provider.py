"""The IdentityProvider contract where a fake stands for the IdP: RotatingIdp (tests/support/fakes.py) against the
real adapter (broker.idp.OidcRefresher) talking to the real oidc-provider with rotation on (tests/idp). Answers the
real IdP cannot give on cue (429 with Retry-After, absurd lifetimes) are tests/unit/test_idp.py's and
tests/integration/test_idp_answers.py's; ScriptedIdp replays such answers and is held to nothing here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest

from broker.core.interfaces import IdentityProvider
from broker.errors import IdpOutcomeUnknown, IdpRejected, IdpUnavailable
from broker.idp import OidcRefresher
from broker.model import Secret
from tests.support.fakes import FakeClock, RotatingIdp
from tests.support.idp import CLIENT_ID, CLIENT_SECRET, OidcTestProvider


class Backend(Protocol):
    idp: IdentityProvider

    def now(self) -> datetime: ...

    async def login(self) -> Secret:
        """A new grant's refresh token."""

    def set_fault(self, mode: str) -> None:
        """ "ok", "down" (an outage before the token is looked at) or "garbage" (an unreadable 2xx)."""


class Fake:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.fake = RotatingIdp(self.clock)
        self.idp: IdentityProvider = self.fake

    def now(self) -> datetime:
        return self.clock.now()

    async def login(self) -> Secret:
        return self.fake.login().refresh_token

    def set_fault(self, mode: str) -> None:
        self.fake.fault = mode


class Real:
    def __init__(self, provider: OidcTestProvider, refresher: OidcRefresher) -> None:
        self.provider = provider
        self.idp: IdentityProvider = refresher
        self._logins = 0

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def login(self) -> Secret:
        self._logins += 1
        return Secret((await self.provider.login(f"contract-{id(self)}-{self._logins}")).refresh_token)

    def set_fault(self, mode: str) -> None:
        self.provider.set_fault(mode)


@pytest.fixture(params=["fake", "oidc-provider"])
async def backend(request: pytest.FixtureRequest, idp: OidcTestProvider) -> AsyncIterator[Backend]:
    if request.param == "fake":
        yield Fake()
        return
    refresher = OidcRefresher(client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET), timeout=5, issuer=idp.issuer)
    try:
        yield Real(idp, refresher)
    finally:
        await refresher.aclose()


async def test_a_refresh_rotates_the_refresh_token(backend: Backend) -> None:
    refresh = await backend.login()
    renewed = await backend.idp.refresh(refresh)
    assert renewed.refresh_token
    assert renewed.refresh_token != refresh
    assert renewed.access_token
    assert renewed.expiry is not None
    assert renewed.expiry > backend.now() + timedelta(minutes=5)


async def test_the_rotated_token_refreshes_again(backend: Backend) -> None:
    first = await backend.idp.refresh(await backend.login())
    second = await backend.idp.refresh(first.refresh_token)
    assert second.refresh_token not in (first.refresh_token, Secret(""))
    assert second.access_token != first.access_token


async def test_a_used_refresh_token_is_refused_with_invalid_grant(backend: Backend) -> None:
    refresh = await backend.login()
    await backend.idp.refresh(refresh)
    with pytest.raises(IdpRejected) as refused:
        await backend.idp.refresh(refresh)
    assert refused.value.error == "invalid_grant"


async def test_reusing_a_used_token_revokes_the_rotated_one_too(backend: Backend) -> None:
    refresh = await backend.login()
    rotated = await backend.idp.refresh(refresh)
    with pytest.raises(IdpRejected):
        await backend.idp.refresh(refresh)
    with pytest.raises(IdpRejected) as refused:
        await backend.idp.refresh(rotated.refresh_token)
    assert refused.value.error == "invalid_grant"


async def test_another_grant_survives_a_reuse(backend: Backend) -> None:
    mine, other = await backend.login(), await backend.login()
    await backend.idp.refresh(mine)
    with pytest.raises(IdpRejected):
        await backend.idp.refresh(mine)
    assert (await backend.idp.refresh(other)).refresh_token != other


async def test_an_unknown_refresh_token_is_refused_with_invalid_grant(backend: Backend) -> None:
    with pytest.raises(IdpRejected) as refused:
        await backend.idp.refresh(Secret("never-issued"))
    assert refused.value.error == "invalid_grant"


async def test_an_outage_is_not_a_rejection_and_keeps_the_token(backend: Backend) -> None:
    refresh = await backend.login()
    backend.set_fault("down")
    with pytest.raises(IdpUnavailable) as failed:
        await backend.idp.refresh(refresh)
    assert not isinstance(failed.value, IdpOutcomeUnknown)  # nothing was rotated: the marker may be lifted
    backend.set_fault("ok")
    assert (await backend.idp.refresh(refresh)).refresh_token != refresh


async def test_an_unreadable_answer_is_an_unknown_outcome(backend: Backend) -> None:
    refresh = await backend.login()
    backend.set_fault("garbage")
    with pytest.raises(IdpOutcomeUnknown):
        await backend.idp.refresh(refresh)
