"""The real test OpenID provider (npm oidc-provider) as a subprocess, and a headless authorization-code login."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from tests.support.processes import terminate

IDP_DIR = Path(__file__).resolve().parent.parent / "idp"
CLIENT_ID = "broker"
CLIENT_SECRET = "broker-secret-7f3a9c"  # a known value the leak tests search for
REDIRECT_URI = "http://127.0.0.1/callback"


@dataclass
class IssuedTokens:
    access_token: str
    refresh_token: str
    expires_in: int


class OidcTestProvider:
    """One oidc-provider process on 127.0.0.1 with rotation on; stats come from its own event hooks."""

    def __init__(self, access_ttl: int = 3600) -> None:
        env = dict(
            os.environ,
            IDP_CLIENT_ID=CLIENT_ID,
            IDP_CLIENT_SECRET=CLIENT_SECRET,
            IDP_ACCESS_TOKEN_TTL=str(access_ttl),
            NODE_NO_WARNINGS="1",
        )
        self.proc = subprocess.Popen(
            ["node", str(IDP_DIR / "idp.mjs")],
            cwd=IDP_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("test IdP did not start (is `npm ci --prefix tests/idp` done?)")
        self.issuer: str = json.loads(line)["issuer"]
        self.token_url = f"{self.issuer}/token"

    def close(self) -> None:
        terminate(self.proc)

    def stats(self) -> dict[str, int]:
        r = httpx2.get(f"{self.issuer}/__test/stats", timeout=5)
        r.raise_for_status()
        return dict(r.json())

    def refresh_directly(self, refresh_token: str) -> httpx2.Response:
        """Use a refresh token as another client would (rotates it; reusing a rotated one revokes the grant)."""
        return httpx2.post(
            self.token_url,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(CLIENT_ID, CLIENT_SECRET),
            timeout=5,
        )

    def revoke(self, token: str) -> None:
        """Revoke an access token at the IdP (RFC 7009), as an administrator ending a session would."""
        r = httpx2.post(
            f"{self.issuer}/token/revocation",
            data={"token": token, "token_type_hint": "access_token"},
            auth=(CLIENT_ID, CLIENT_SECRET),
            timeout=5,
        )
        r.raise_for_status()

    def forget(self, access_token: str) -> None:
        """Drop one access token at the IdP, not its grant: it is then invalid, while the refresh token works."""
        r = httpx2.post(f"{self.issuer}/__test/forget", json={"token": access_token}, timeout=5)
        r.raise_for_status()
        assert r.json()["forgotten"]

    def active(self, token: str) -> bool:
        """Whether the IdP still considers an access token active (RFC 7662 introspection)."""
        r = httpx2.post(
            f"{self.issuer}/token/introspection", data={"token": token}, auth=(CLIENT_ID, CLIENT_SECRET), timeout=5
        )
        r.raise_for_status()
        return bool(r.json().get("active"))

    def allow_exchange(
        self, resource: str, clients: tuple[str, ...] = (CLIENT_ID,), *, ttl: int = 3600, expires_in: bool = True
    ) -> None:
        """Let `clients` exchange tokens (RFC 8693) for `resource`; issued tokens live `ttl` seconds (and say so in
        expires_in unless `expires_in` is False: the JWT's exp is then the only hint)."""
        r = httpx2.post(
            f"{self.issuer}/__test/exchange",
            json={"resource": resource, "clients": list(clients), "ttl": ttl, "expires_in": expires_in},
            timeout=5,
        )
        r.raise_for_status()

    def set_fault(self, mode: str = "ok", delay_ms: int = 0) -> None:
        r = httpx2.post(f"{self.issuer}/__test/fault", json={"mode": mode, "delay_ms": delay_ms}, timeout=5)
        r.raise_for_status()

    async def login(self, subject: str) -> IssuedTokens:
        """Drive the authorization-code flow headlessly: devInteractions login form, then consent."""
        async with httpx2.AsyncClient(base_url=self.issuer, timeout=10, follow_redirects=False) as http:
            params = {
                "client_id": CLIENT_ID,
                "response_type": "code",
                "redirect_uri": REDIRECT_URI,
                "scope": "openid offline_access",
                "prompt": "consent",
                "state": "s",
            }
            r = await http.get("/auth", params=params)
            code = None
            for _ in range(10):
                loc = r.headers.get("location")
                if loc is not None:
                    if loc.startswith(REDIRECT_URI):
                        code = urllib.parse.parse_qs(urllib.parse.urlparse(loc).query)["code"][0]
                        break
                    r = await http.get(loc)
                    continue
                action = re.search(r'action="([^"]+)"', r.text)
                prompt = re.search(r'name="prompt" value="([^"]+)"', r.text)
                assert action, r.text[:500]
                assert prompt, r.text[:500]
                form: dict[str, Any] = {"prompt": prompt.group(1)}
                if prompt.group(1) == "login":
                    form.update(login=subject, password="x")
                r = await http.post(action.group(1), data=form)
            assert code, "authorization code not issued"
            r = await http.post(
                "/token",
                data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
                auth=(CLIENT_ID, CLIENT_SECRET),
            )
            r.raise_for_status()
            body = r.json()
            return IssuedTokens(body["access_token"], body["refresh_token"], int(body["expires_in"]))
