"""A small OAuth token endpoint of the tests' own, for answers oidc-provider cannot give on cue: 429 with
Retry-After, absurd `expires_in`, an unreadable 2xx, a hanging discovery, a rotation grace (overlap) window.

It rotates refresh tokens like a real IdP: each refresh token is good once, and a used one is answered with
invalid_grant, except within `grace` seconds of its first use (the overlap that Auth0, Okta and Cognito offer).
Every request is counted; answers can be scripted to override the rotation for the next calls.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.broker import broker_env
from tests.support.pg import Database


@dataclass
class Scripted:
    status: int
    body: str | dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class TokenEndpoint:
    """Serves /token and /.well-known/openid-configuration on 127.0.0.1 from a thread."""

    def __init__(self, *, grace: float = 0.0, expires_in: Any = 3600) -> None:
        self.grace = grace
        self.expires_in = expires_in
        self.script: list[Scripted] = []
        self.discovery_delay = 0.0
        self.token_delay = 0.0
        self.sent: list[str] = []  # refresh tokens received, in order
        self.headers: list[dict[str, str]] = []  # the token requests' headers, in order
        self.grants = 0  # successful refresh grants
        self.reused = 0  # a used refresh token sent again
        self._issued = 0
        self._grants_issued = 0
        self._grant_of: dict[str, int] = {}
        self._revoked: set[int] = set()
        self._live: set[str] = set()
        self._used_at: dict[str, float] = {}
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                time.sleep(endpoint.discovery_delay)
                if self.path == "/.well-known/openid-configuration":
                    endpoint._send(self, 200, {"issuer": endpoint.issuer, "token_endpoint": endpoint.token_url})
                else:
                    endpoint._send(self, 404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                endpoint.headers.append({k.lower(): v for k, v in self.headers.items()})
                endpoint._token(self, form.get("refresh_token", [""])[0])

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.token_url = f"{self.issuer}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def issue(self) -> tuple[str, str]:
        """A fresh (access, refresh) pair of a new grant, as a login would give."""
        with self._lock:
            self._grants_issued += 1
            return self._new_pair(self._grants_issued)

    def _new_pair(self, grant: int) -> tuple[str, str]:
        self._issued += 1
        refresh = f"rt-{self._issued}"
        self._live.add(refresh)
        self._grant_of[refresh] = grant
        return f"at-{self._issued}", refresh

    def _token(self, handler: BaseHTTPRequestHandler, refresh: str) -> None:
        time.sleep(self.token_delay)
        with self._lock:
            self.sent.append(refresh)
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            time.sleep(scripted.delay)
            self._send(handler, scripted.status, scripted.body, scripted.headers)
            return
        with self._lock:
            now = time.monotonic()
            grant = self._grant_of.get(refresh)
            ok = False
            if refresh in self._live:
                self._live.discard(refresh)
                self._used_at[refresh] = now
                ok = True
            elif refresh in self._used_at and grant not in self._revoked:
                if now - self._used_at[refresh] <= self.grace:
                    ok = True  # the overlap window: a used token still works once more
                else:
                    self.reused += 1  # reuse detection: the whole grant is revoked
                    if grant is not None:
                        self._revoked.add(grant)
                    self._live -= {t for t, g in self._grant_of.items() if g == grant}
            if ok and grant is not None:
                self.grants += 1
                access, new_refresh = self._new_pair(grant)
        if not ok:
            self._send(handler, 400, {"error": "invalid_grant"})
            return
        reply: dict[str, Any] = {"access_token": access, "refresh_token": new_refresh, "token_type": "Bearer"}
        if self.expires_in is not None:
            reply["expires_in"] = self.expires_in
        self._send(handler, 200, reply)

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler, status: int, body: str | dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        # json.dumps writes Infinity and NaN for floats, as a careless IdP would.
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout test)


def env_for(db: Database, ep: TokenEndpoint, **overrides: str) -> dict[str, str]:
    """The broker's settings with this endpoint as its IdP (discovery at `ep.issuer`)."""
    env = broker_env(db, BROKER_OIDC_ISSUER=ep.issuer, BROKER_OIDC_CLIENT_ID="broker")
    env.update(BROKER_OIDC_CLIENT_SECRET="test-secret", **overrides)
    return env


async def expired_user(db: Database, ep: TokenEndpoint) -> tuple[uuid.UUID, str]:
    """A user whose stored token expired five minutes ago, with a fresh grant of this endpoint; (id, refresh)."""
    uid = uuid.uuid4()
    access, refresh = ep.issue()
    await db.insert_link(uid, access, refresh, datetime.now(UTC) - timedelta(minutes=5))
    return uid, refresh
