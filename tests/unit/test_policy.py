"""The refresh decision table and token-lifetime parsing: pure functions, no I/O."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from broker.core.policy import Decision, decide, expiry_from_response, is_expired, needs_refresh
from broker.model import Link, Secret
from broker.postgres.codec import ZERO_TIME, normalise_expiry

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LEEWAY = timedelta(seconds=600)


def link(expiry: datetime | None, refresh: str = "r", access: str = "a") -> Link:
    return Link(uuid.uuid4(), Secret(access), Secret(refresh), expiry)


@pytest.mark.parametrize(
    ("case", "lnk", "expected"),
    [
        ("no refresh token, expired", link(NOW - timedelta(1), refresh=""), False),
        ("zero expiry (never expires)", link(None), False),
        ("expired", link(NOW - timedelta(seconds=1)), True),
        ("fresh", link(NOW + timedelta(hours=1)), False),
        ("inside the leeway window", link(NOW + timedelta(seconds=599)), True),
        ("exactly at the boundary", link(NOW + LEEWAY), True),
        ("one microsecond outside", link(NOW + LEEWAY + timedelta(microseconds=1)), False),
        ("empty access token with refresh token", link(NOW + timedelta(hours=1), access=""), True),
    ],
)
def test_needs_refresh_decision_table(case: str, lnk: Link, expected: bool) -> None:
    assert needs_refresh(lnk, NOW, LEEWAY) is expected, case


def test_is_expired() -> None:
    assert is_expired(link(NOW), NOW)
    assert not is_expired(link(NOW + timedelta(seconds=1)), NOW)
    assert not is_expired(link(None), NOW)
    assert is_expired(link(None, access=""), NOW)


@pytest.mark.parametrize(
    ("lnk", "ahead", "decision"),
    [
        (link(NOW + timedelta(hours=1)), timedelta(seconds=60), Decision.SERVE),
        (link(NOW + timedelta(seconds=650)), timedelta(seconds=60), Decision.SERVE_AND_REFRESH_AHEAD),
        (link(NOW + timedelta(seconds=650)), timedelta(0), Decision.SERVE),
        (link(NOW + timedelta(seconds=650), refresh=""), timedelta(seconds=60), Decision.SERVE),
        (link(NOW + timedelta(seconds=300)), timedelta(seconds=60), Decision.REFRESH),
        (link(NOW - timedelta(seconds=1), refresh=""), timedelta(seconds=60), Decision.EXPIRED),
        (link(None), timedelta(seconds=60), Decision.SERVE),
    ],
)
def test_decide(lnk: Link, ahead: timedelta, decision: Decision) -> None:
    assert decide(lnk, NOW, LEEWAY, ahead) is decision


def test_zero_time_normalises_to_never() -> None:
    assert normalise_expiry(ZERO_TIME) is None
    assert normalise_expiry(None) is None
    assert normalise_expiry(NOW) == NOW


def _jwt(claims: dict[str, object]) -> str:
    enc = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJub25lIn0.{enc}.sig"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"expires_in": 3600}, NOW + timedelta(hours=1)),
        ({"expires_in": "120"}, NOW + timedelta(seconds=120)),
        ({"expires_at": NOW.timestamp() + 60}, NOW + timedelta(seconds=60)),
        ({"access_token": _jwt({"exp": int(NOW.timestamp()) + 300})}, NOW + timedelta(seconds=300)),
        ({"expires_in": 0, "access_token": _jwt({"exp": int(NOW.timestamp()) + 5})}, NOW + timedelta(seconds=5)),
        ({"access_token": "opaque"}, None),
        ({"expires_in": True, "access_token": "opaque"}, None),
        ({"access_token": "a.b.c"}, None),
    ],
)
def test_expiry_from_response(body: dict[str, object], expected: datetime | None) -> None:
    assert expiry_from_response(body, NOW) == expected


def test_secrets_never_print() -> None:
    s = Secret("super-secret-value")
    lnk = Link(uuid.uuid4(), s, Secret("refresh-secret"), None)
    for text in (repr(s), str(s), repr(lnk), f"{lnk}"):
        assert "super-secret-value" not in text
        assert "refresh-secret" not in text
    assert s.reveal() == "super-secret-value"
