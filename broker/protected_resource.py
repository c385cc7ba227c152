"""RFC 9728 at start-up: each configured MCP server's protected resource metadata
(`/.well-known/oauth-protected-resource`), read once, and a warning when it does not name the broker's issuer among
its `authorization_servers` (the tokens the broker exchanges for it would then be refused there) or names another
resource. Advisory only: a server without the document, or one that cannot be reached, is logged at INFO."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import httpx2

log = logging.getLogger("broker.resources")

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(resource: str) -> str:
    """RFC 9728 section 3.1: the well-known path inserted between the host and the resource's path (query and
    fragment dropped)."""
    parts = urlsplit(resource)
    path = parts.path if parts.path not in ("", "/") else ""
    return urlunsplit((parts.scheme, parts.netloc, WELL_KNOWN + path, "", ""))


def _same_issuer(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


async def check_protected_resources(
    resources: Iterable[str], issuer: str, *, timeout: float, transport: httpx2.AsyncBaseTransport | None = None
) -> dict[str, str]:
    """resource -> what was found ("ok", "other_issuer", "other_resource", "no_metadata"); each finding logged."""
    found: dict[str, str] = {}
    async with httpx2.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport) as http:
        for resource in resources:
            found[resource] = await _check(http, resource, issuer)
    return found


async def _check(http: httpx2.AsyncClient, resource: str, issuer: str) -> str:
    url = metadata_url(resource)
    try:
        resp = await http.get(url)
        document = resp.json() if resp.status_code == 200 else None
    except (TimeoutError, httpx2.HTTPError, ValueError) as exc:
        log.info("no protected resource metadata for %s (%s)", resource, type(exc).__name__)
        return "no_metadata"
    if not isinstance(document, dict):
        log.info("no protected resource metadata for %s (HTTP %s)", resource, resp.status_code)
        return "no_metadata"
    servers = document.get("authorization_servers")
    names = [s for s in servers if isinstance(s, str)] if isinstance(servers, list) else []
    if not any(_same_issuer(s, issuer) for s in names):
        log.warning(
            "the MCP server %s does not name this broker's issuer %s among its authorization_servers (%s): the "
            "tokens exchanged for it will be refused there",
            resource,
            issuer,
            ", ".join(names[:5]) or "none",
        )
        return "other_issuer"
    named = document.get("resource")
    if isinstance(named, str) and named.rstrip("/") != resource.rstrip("/"):
        log.warning("the MCP server %s describes itself as the resource %s", resource, named[:200])
        return "other_resource"
    return "ok"
