"""Pure refresh policy: when to refresh, when a token is expired, and how to read a token response's lifetime.

Bounds (documented in the README):
- a lifetime from the IdP (`expires_in`, `expires_at`, a JWT `exp`) is used only when it is a finite number of
  seconds in (0, MAX_LIFETIME]; longer ones are clamped to MAX_LIFETIME, and nonsense is ignored;
- with no usable lifetime the token is stored with the product's zero time, "never expires", as the Go product
  does for a token response without `expires_in`;
- the refresh leeway is at most half of the token's lifetime (`effective_leeway`), so a token that lives 300 s is
  not refreshed on every request under the product's 600 s leeway.
"""

from __future__ import annotations

import base64
import enum
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.model import Link, Secret

#: The longest access-token lifetime the broker believes; longer ones are clamped.
MAX_LIFETIME = timedelta(days=366)


class Decision(enum.Enum):
    """What to do with a stored link right now."""

    SERVE = "serve"  # outside every window, or never expires
    SERVE_AND_REFRESH_AHEAD = "serve_and_refresh_ahead"  # serve now; refresh in the background
    REFRESH = "refresh"  # inside the leeway window (or expired) and refreshable
    EXPIRED = "expired"  # expired and not refreshable


def effective_leeway(leeway: timedelta, lifetime: timedelta | None) -> timedelta:
    """The leeway, but at most half of the token's lifetime when that is known."""
    if lifetime is None or lifetime <= timedelta(0):
        return leeway
    return min(leeway, lifetime / 2)


def needs_refresh(link: Link, now: datetime, leeway: timedelta, lifetime: timedelta | None = None) -> bool:
    """Refresh when the link has a refresh token and either a non-zero expiry with now >= expiry - leeway, or no
    access token at all. The leeway is capped by the token's lifetime (`lifetime`, else the JWT's iat..exp)."""
    if not link.refresh_token:
        return False
    if not link.access_token:
        return True
    if link.expiry is None or now < link.expiry - leeway:
        return False
    # Inside the configured window: only here is the lifetime worth reading.
    known = lifetime if lifetime is not None else jwt_lifetime(link.access_token)
    return now >= link.expiry - effective_leeway(leeway, known)


def is_expired(link: Link, now: datetime) -> bool:
    """A token with no expiry never expires; otherwise it is expired at and after its expiry. An empty token is
    unusable, so it counts as expired."""
    if not link.access_token:
        return True
    return link.expiry is not None and now >= link.expiry


def decide(
    link: Link, now: datetime, leeway: timedelta, ahead: timedelta, lifetime: timedelta | None = None
) -> Decision:
    """The full decision table, including the optional refresh-ahead window just before the leeway window."""
    if needs_refresh(link, now, leeway, lifetime):
        return Decision.REFRESH
    if is_expired(link, now):
        return Decision.EXPIRED
    if ahead > timedelta(0) and link.refresh_token and link.expiry is not None:
        window = effective_leeway(leeway, lifetime if lifetime is not None else jwt_lifetime(link.access_token))
        if now >= link.expiry - window - min(ahead, window):
            return Decision.SERVE_AND_REFRESH_AHEAD
    return Decision.SERVE


def _seconds(value: Any) -> float | None:
    """A finite, positive number of seconds (numbers and digit strings), else None."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        return MAX_LIFETIME.total_seconds()
    if math.isnan(seconds) or math.isinf(seconds) or seconds <= 0:
        return None
    return seconds


def _jwt_claims(token: str) -> Mapping[str, Any] | None:
    """The payload of a JWT, read without verification (only as a lifetime hint)."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _at(epoch: Any, now: datetime) -> datetime | None:
    seconds = _seconds(epoch)
    if seconds is None:
        return None
    latest = now + MAX_LIFETIME
    if seconds >= latest.timestamp():
        return latest
    return datetime.fromtimestamp(seconds, UTC)


def jwt_lifetime(access_token: Secret) -> timedelta | None:
    """exp - iat of a JWT access token, when both are there and sane."""
    claims = _jwt_claims(access_token.reveal())
    if claims is None:
        return None
    iat, exp = _seconds(claims.get("iat")), _seconds(claims.get("exp"))
    if iat is None or exp is None or exp <= iat:
        return None
    return min(timedelta(seconds=exp - iat), MAX_LIFETIME)


def expiry_from_response(body: Mapping[str, Any], now: datetime) -> datetime | None:
    """The new token's expiry: `expires_in`, else `expires_at`, else the JWT `exp`, each clamped to MAX_LIFETIME;
    None (stored as the zero time) with no usable hint. Never raises, whatever the body holds."""
    expires_in = _seconds(body.get("expires_in"))
    if expires_in is not None:
        return now + min(timedelta(seconds=min(expires_in, MAX_LIFETIME.total_seconds())), MAX_LIFETIME)
    expires_at = _at(body.get("expires_at"), now)
    if expires_at is not None:
        return expires_at
    access = body.get("access_token")
    if isinstance(access, str):
        claims = _jwt_claims(access)
        if claims is not None:
            return _at(claims.get("exp"), now)
    return None
