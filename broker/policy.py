"""Pure refresh policy: when to refresh, when a token is expired, and how to read a token response's lifetime."""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.model import Link

#: The Go product stores "no expiry" as the zero time, 0001-01-01 00:00:00+00.
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


class Decision(enum.Enum):
    """What to do with a stored link right now."""

    SERVE = "serve"  # outside every window, or never expires
    SERVE_AND_REFRESH_AHEAD = "serve_and_refresh_ahead"  # serve now; refresh in the background
    REFRESH = "refresh"  # inside the leeway window (or expired) and refreshable
    EXPIRED = "expired"  # expired and not refreshable


def normalise_expiry(expiry: datetime | None) -> datetime | None:
    """Map the product's zero time (and NULL) to None, "never expires"."""
    if expiry is None or expiry <= ZERO_TIME:
        return None
    return expiry


def needs_refresh(link: Link, now: datetime, leeway: timedelta) -> bool:
    """Refresh when the link has a refresh token and either a non-zero expiry with now >= expiry - leeway, or no
    access token at all."""
    if not link.refresh_token:
        return False
    if not link.access_token:
        return True
    return link.expiry is not None and now >= link.expiry - leeway


def is_expired(link: Link, now: datetime) -> bool:
    """A token with no expiry never expires; otherwise it is expired at and after its expiry. An empty token is
    unusable, so it counts as expired."""
    if not link.access_token:
        return True
    return link.expiry is not None and now >= link.expiry


def decide(link: Link, now: datetime, leeway: timedelta, ahead: timedelta) -> Decision:
    """The full decision table, including the optional refresh-ahead window just before the leeway window."""
    if needs_refresh(link, now, leeway):
        return Decision.REFRESH
    if is_expired(link, now):
        return Decision.EXPIRED
    if ahead > timedelta(0) and link.refresh_token and link.expiry is not None and now >= link.expiry - leeway - ahead:
        return Decision.SERVE_AND_REFRESH_AHEAD
    return Decision.SERVE


def _jwt_exp(token: str) -> datetime | None:
    """The `exp` claim of a JWT access token, read without verification (only as a lifetime hint)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            return datetime.fromtimestamp(exp, UTC)
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def expiry_from_response(body: Mapping[str, Any], now: datetime) -> datetime | None:
    """The new token's expiry: `expires_in`, else `expires_at`, else the JWT `exp`; None only with no hint at all."""
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        return now + timedelta(seconds=float(expires_in))
    expires_at = body.get("expires_at")
    if isinstance(expires_at, int | float) and not isinstance(expires_at, bool) and expires_at > 0:
        return datetime.fromtimestamp(expires_at, UTC)
    access = body.get("access_token")
    return _jwt_exp(access) if isinstance(access, str) else None
