"""A small MCP-server stand-in (tests/idp/mcp_server.mjs): accepts only a JWT the test IdP signed for exactly the
URI it was called on, and counts what it accepted and refused."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import httpx2

from tests.support.idp import IDP_DIR, OidcTestProvider
from tests.support.processes import terminate


class McpStandIn:
    """One process; every path is its own resource: `http://127.0.0.1:<port>/<path>`."""

    def __init__(self, idp: OidcTestProvider) -> None:
        env = dict(os.environ, MCP_ISSUER=idp.issuer, NODE_NO_WARNINGS="1")
        self.proc = subprocess.Popen(
            ["node", str(IDP_DIR / "mcp_server.mjs")],
            cwd=IDP_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("MCP stand-in did not start (is `npm ci --prefix tests/idp` done?)")
        self.origin: str = json.loads(line)["origin"]

    def resource(self, name: str | None = None) -> str:
        """A fresh resource URI on this server (each test its own)."""
        return f"{self.origin}/mcp-{name or uuid.uuid4().hex[:10]}"

    def call(self, resource: str, token: str) -> int:
        """The HTTP status the server answers `Authorization: Bearer <token>` on `resource`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx2.post(
            resource, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers, timeout=5
        ).status_code

    def close(self) -> None:
        terminate(self.proc)
