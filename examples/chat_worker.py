"""A chat worker calling an upstream MCP server on behalf of a user, with the user's OIDC token from the broker.

    python examples/chat_worker.py --broker 127.0.0.1:50051 --upstream https://mcp.example.com/mcp USER_ID
    python examples/chat_worker.py --broker ... --upstream https://mcp.example.com/mcp --audience-bound USER_ID

With --audience-bound the worker names the MCP server (its URI is the RFC 8707 resource) and sends it a token the
IdP issued for that server alone, as the MCP authorization specification requires; without it, the login token.

The rule of the original feature: with a token, send `Authorization: Bearer <token>`; without one (password login,
expired, IdP down...), send the request without the header and let the upstream answer 401.

When the upstream answers 401 to a token, the worker reports that token to the broker once (only its SHA-256 is
sent) and retries once with what it gets: a refreshed token, or none (the user must log in again).
"""

from __future__ import annotations

import argparse
import asyncio

import httpx2

from broker.client import TokenBrokerClient


async def call_mcp(
    broker: TokenBrokerClient, http: httpx2.AsyncClient, upstream: str, user_id: str, *, audience_bound: bool = False
) -> int:
    """One upstream request for `user_id`; returns the upstream's HTTP status. `audience_bound`: ask for a token
    issued for `upstream` (its URI is the resource) instead of the login token."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    resource = upstream if audience_bound else None
    headers = await broker.bearer_headers(user_id, resource=resource)
    response = await http.post(upstream, json=body, headers=headers)
    if response.status_code == 401 and headers:
        refused = headers["Authorization"].removeprefix("Bearer ")
        headers = await broker.bearer_headers(user_id, rejected=refused, resource=resource)
        response = await http.post(upstream, json=body, headers=headers)
    return response.status_code


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user_id")
    parser.add_argument("--broker", default="127.0.0.1:50051")
    parser.add_argument("--upstream", required=True, help="the MCP server's URI")
    parser.add_argument("--audience-bound", action="store_true", help="send a token issued for the MCP server")
    args = parser.parse_args()
    async with TokenBrokerClient(args.broker) as broker, httpx2.AsyncClient(timeout=10) as http:
        print(await call_mcp(broker, http, args.upstream, args.user_id, audience_bound=args.audience_bound))


if __name__ == "__main__":
    asyncio.run(main())
