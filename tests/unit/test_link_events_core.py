"""Link events in the domain (on fakes) and their outside form: one event per state change, the recorded state
answers without the IdP, and the Standard Webhooks signature verifies with the reference library."""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook

from broker.config import Settings, webhook_key
from broker.errors import ConfigError, IdpRejected
from broker.events import payload
from broker.events.webhook import redacted
from broker.model import LinkEvent, Secret, TokenStatus
from broker.server.watch import parse_cursor
from tests.support.fakes import link, tokens
from tests.unit.test_refresh_core import make_core

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


class TestState:
    async def test_invalid_grant_records_the_state_once_and_later_calls_never_reach_the_idp(self) -> None:
        c = make_core(IdpRejected("invalid_grant"))
        results = [await c.get() for _ in range(5)]
        assert {r.status for r in results} == {TokenStatus.REAUTH_REQUIRED}
        assert len(c.idp.sent) == 1
        assert c.store.link_events == [("link.reauth_required", c.user)]

    async def test_a_new_login_is_one_recovered_and_the_new_tokens_are_served(self) -> None:
        c = make_core(IdpRejected("invalid_grant"))
        await c.get()
        c.store.put(link(c.user, 7, c.clock.now() + timedelta(hours=1)))  # a new login
        for _ in range(3):
            r = await c.get()
            assert (r.status, r.access_token.reveal()) == (TokenStatus.VALID, "access-7")
        assert c.store.link_events == [("link.reauth_required", c.user), ("link.recovered", c.user)]
        assert c.store.states == {}

    async def test_a_new_login_that_needs_a_refresh_recovers_then_refreshes(self) -> None:
        c = make_core(IdpRejected("invalid_grant"))
        await c.get()
        c.store.put(link(c.user, 7, c.clock.now() - timedelta(seconds=1)))
        c.idp.script.append(tokens(8, c.clock))
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REFRESHED, "access-8")
        assert [e for e, _ in c.store.link_events] == ["link.reauth_required", "link.recovered"]

    async def test_expired_without_a_refresh_token_is_recorded_and_still_answers_expired(self) -> None:
        c = make_core()
        c.store.put(replace(c.store.rows[c.user], refresh_token=Secret("")))
        assert {(await c.get()).status for _ in range(3)} == {TokenStatus.EXPIRED}
        assert c.store.link_events == [("link.reauth_required", c.user)]

    async def test_a_known_dead_link_with_a_token_still_valid_serves_it(self) -> None:
        c = make_core(expired=False)
        row = c.store.rows[c.user]
        c.store.states[c.user] = row.fingerprint()
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.VALID, "access-0")
        forced = await c.tokens.get_token(c.user, 5.0, rejected=row.access_token.sha256())
        assert forced.status is TokenStatus.REAUTH_REQUIRED  # the upstream refused it: no refresh, no token
        assert c.idp.sent == []

    async def test_a_known_dead_link_never_serves_a_token_an_upstream_rejected_before(self) -> None:
        """Both records at once (the rejection, #21, and the dead refresh token, #25): the rejected token is not
        served on a later plain call, by this process or any other that reads the same rows."""
        c = make_core(expired=False)
        row = c.store.rows[c.user]
        c.store.states[c.user] = row.fingerprint()
        c.store.rejected_access[c.user] = row.access_token.sha256()
        r = await c.get()
        assert (r.status, r.access_token.reveal()) == (TokenStatus.REAUTH_REQUIRED, "")
        assert c.idp.sent == []

    async def test_an_outage_records_nothing(self) -> None:
        from broker.errors import IdpUnavailable

        c = make_core(IdpUnavailable("down"))
        assert (await c.get()).status is TokenStatus.IDP_UNAVAILABLE
        assert c.store.link_events == []
        assert c.store.states == {}


def event(**fields: object) -> LinkEvent:
    base: dict[str, object] = {
        "id": 42,
        "type": "link.reauth_required",
        "user_id": uuid.uuid4(),
        "occurred_at": datetime(2026, 12, 3, 10, 0, tzinfo=UTC),
        "error": "invalid_grant",
    }
    base.update(fields)
    return LinkEvent(**base)  # type: ignore[arg-type]  # the test builds it from a dict


class TestPayload:
    def test_the_signature_verifies_with_the_standard_webhooks_library(self) -> None:
        e = event()
        body = payload.body(e)
        key = webhook_key(Secret(SECRET))
        assert key is not None
        import time

        headers = payload.headers(key, e, body, time.time())
        assert headers["webhook-id"] == "evt_42"
        got = Webhook(SECRET).verify(body, headers)
        assert got["type"] == "link.reauth_required"
        assert got["data"] == {
            "id": "42",
            "type": "link.reauth_required",
            "occurred_at": "2026-12-03T10:00:00.000Z",
            "user_id": str(e.user_id),
            "error": "invalid_grant",
            "forced": False,
        }

    def test_recovered_carries_how(self) -> None:
        data = json.loads(payload.body(event(type="link.recovered", recovered_by="login", error="")))["data"]
        assert data["recovered_by"] == "login"
        assert "error" not in data

    def test_backoff_starts_within_seconds_and_is_capped(self) -> None:
        assert payload.backoff(1, 1.0) == 1.0
        assert payload.backoff(3, 0.5) == 2.0
        assert payload.backoff(50, 1.0) == 300.0
        assert max(payload.backoff(n, 1.0) for n in range(1, 1000)) == 300.0  # a receiver back is retried in 5 min

    def test_cursor(self) -> None:
        assert parse_cursor("") is None
        assert parse_cursor("17") == 17
        assert parse_cursor("evt_17") == 17
        for bad in ("x", "-1", "1.5", "9" * 19):
            with pytest.raises(ValueError, match=r"."):
                parse_cursor(bad)

    def test_urls_in_logs_lose_their_query_and_user_info(self) -> None:
        assert redacted("https://user:pw@hooks.example.com:8443/in?token=abc") == "https://hooks.example.com:8443/in"


class TestSettings:
    def test_webhook_settings(self) -> None:
        url = "https://hooks.example.com/x?token=url-credential"
        s = Settings.from_env({"BROKER_WEBHOOK_URL": url, "BROKER_WEBHOOK_SECRET": SECRET})
        assert "url-credential" not in repr(s)
        assert s.events.webhook_enabled
        assert s.events.retention == 7 * 86400
        assert s.events.webhook_retry_period == 86400
        assert s.events.watchers == frozenset()
        assert SECRET not in repr(s)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"BROKER_WEBHOOK_URL": "http://hooks.example.com/x", "BROKER_WEBHOOK_SECRET": SECRET}, "must be https"),
            ({"BROKER_WEBHOOK_URL": "https://hooks.example.com/x"}, "required with BROKER_WEBHOOK_URL"),
            ({"BROKER_WEBHOOK_SECRET": "not-a-whsec-value"}, "whsec_"),
            ({"BROKER_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"short").decode()}, "24 to 64 bytes"),
            ({"BROKER_EVENT_RETENTION": "a week"}, "BROKER_EVENT_RETENTION"),
            ({"BROKER_EVENT_WATCHERS": "nobody"}, "BROKER_EVENT_WATCHERS"),
        ],
    )
    def test_bad_settings_are_named(self, env: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigError, match=message) as err:
            Settings.from_env(env)
        assert "not-a-whsec-value" not in str(err.value)

    def test_http_on_loopback_or_when_allowed(self) -> None:
        for url, extra in (
            ("http://127.0.0.1:9/x", {}),
            ("http://hooks.mesh/x", {"BROKER_WEBHOOK_ALLOW_HTTP": "true"}),
        ):
            s = Settings.from_env({"BROKER_WEBHOOK_URL": url, "BROKER_WEBHOOK_SECRET": SECRET, **extra})
            assert s.events.webhook_url == url

    def test_retention_durations(self) -> None:
        for text, seconds in (("36h", 129600), ("90m", 5400), ("2d", 172800), ("600", 600)):
            assert Settings.from_env({"BROKER_EVENT_RETENTION": text}).events.retention == seconds

    def test_an_unpadded_secret_is_accepted_as_the_library_does(self) -> None:
        raw = os.urandom(32)
        assert webhook_key(Secret("whsec_" + base64.b64encode(raw).decode().rstrip("="))) == raw
