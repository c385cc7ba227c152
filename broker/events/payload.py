"""What a link event looks like outside: the Standard Webhooks JSON body and its signature. Pure functions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from broker.model import REAUTH_REQUIRED, LinkEvent


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def data(event: LinkEvent) -> dict[str, Any]:
    """The event's fields: id, type, occurred_at, user_id, then error and forced, or recovered_by."""
    fields: dict[str, Any] = {
        "id": str(event.id),
        "type": event.type,
        "occurred_at": _iso(event.occurred_at),
        "user_id": str(event.user_id),
    }
    if event.type == REAUTH_REQUIRED:
        fields.update(error=event.error, forced=event.forced)
    else:
        fields["recovered_by"] = event.recovered_by
    return fields


def body(event: LinkEvent) -> bytes:
    """The webhook body: {"type", "timestamp", "data"} as Standard Webhooks suggests."""
    doc = {"type": event.type, "timestamp": _iso(event.occurred_at), "data": data(event)}
    return json.dumps(doc, separators=(",", ":")).encode()


def message_id(event: LinkEvent) -> str:
    """The webhook-id: the same on every attempt, so receivers can drop duplicates."""
    return f"evt_{event.id}"


def sign(key: bytes, msg_id: str, timestamp: int, payload: bytes) -> str:
    """webhook-signature: `v1,` + base64 HMAC-SHA256 over `id.timestamp.body`."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(key: bytes, event: LinkEvent, payload: bytes, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed with the current time."""
    msg_id, ts = message_id(event), int(now)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(key, msg_id, ts, payload),
    }


def backoff(attempts: int, jitter: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones: 1, 2, 4 ... capped at 300, times `jitter` in
    [0.5, 1] so replicas that failed together do not retry together."""
    return min(2.0 ** max(attempts - 1, 0), 300.0) * jitter
