"""Which caller may get a token for which resource: the resource policy (BROKER_RESOURCES_FILE), and the RFC 8707
resource URI rules. Pure: the file is read by the composition root, the document is validated here.

A document is a list of entries (or `{"resources": [...]}`), each:

    resource: https://mcp.example.com/mcp     # the MCP server's canonical URI, sent to the IdP as written here
    audience: mcp-example                     # optional: RFC 8693 `audience` (IdPs that want a client id)
    scope: "tools.read tools.call"            # optional: RFC 8693 `scope`
    callers: [uri:spiffe://cluster/ns/chat/sa/worker, token:chat]   # identities, in the allowlist syntax
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from broker.errors import ConfigError
from broker.identities import parse_allowed
from broker.urls import is_loopback_host

_DEFAULT_PORTS = {"https": 443, "http": 80}
_FIELDS = frozenset({"resource", "audience", "scope", "callers"})


def normalise_resource(uri: str) -> str:
    """The canonical form of an RFC 8707 resource URI: lower-case scheme and host, the default port dropped, the
    path and query kept as they are. ValueError (with what is wrong, never more than the rule) for a relative URI,
    a fragment, userinfo, a scheme other than https (http only for a loopback host) or an unparsable value."""
    if not uri or len(uri) > 2048 or not uri.isascii() or any(c.isspace() or ord(c) < 0x20 for c in uri):
        raise ValueError("must be an absolute https URI")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        raise ValueError("cannot be parsed as a URI") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not scheme or not host:
        raise ValueError("must be an absolute URI (scheme and host)")
    if "#" in uri:
        raise ValueError("must not have a fragment")
    if "@" in parts.netloc:
        raise ValueError("must not carry userinfo")
    if scheme != "https" and not (scheme == "http" and is_loopback_host(host)):
        raise ValueError("must be https (http only for a loopback host)")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, parts.path, parts.query, ""))


@dataclass(frozen=True, slots=True)
class ResourceEntry:
    """One resource of the policy: what is sent to the IdP, and who may ask for it."""

    resource: str
    """The URI as the policy names it (sent to the IdP as `resource`)."""
    audience: str = ""
    """RFC 8693 `audience`, "" when not sent."""
    scope: str = ""
    """RFC 8693 `scope`, "" when not sent."""
    callers: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple[str, str, str]:
        """What an exchanged token is cached under, with the user id."""
        return (self.resource, self.audience, self.scope)

    def fingerprint(self) -> str:
        """A short id of the key for logs and task names (no secret in it anyway)."""
        return hashlib.sha256("\0".join(self.key).encode()).hexdigest()[:12]


class ResourcePolicy:
    """Entries by normalised resource. `match` answers the entry when one of the caller's identities is listed."""

    def __init__(self, entries: Iterable[ResourceEntry] = ()) -> None:
        self._by_resource = {normalise_resource(e.resource): e for e in entries}

    def __len__(self) -> int:
        return len(self._by_resource)

    def current(self) -> ResourcePolicy:
        """A fixed policy is its own source (the servicer asks its source for the policy in force)."""
        return self

    def entries(self) -> list[ResourceEntry]:
        return list(self._by_resource.values())

    def match(self, normalised: str, identities: Iterable[str]) -> ResourceEntry | None:
        """The entry for `normalised` when any of `identities` is listed for it; None for an unknown resource and
        for a caller not listed alike (the caller must not learn which resources exist)."""
        entry = self._by_resource.get(normalised)
        if entry is None:
            return None
        return entry if any(i in entry.callers for i in identities) else None

    def callers(self) -> frozenset[str]:
        """Every caller some entry names (the chart's mesh policies admit these)."""
        return frozenset(c for e in self._by_resource.values() for c in e.callers)


def parse_policy(document: Any, *, allowed_callers: frozenset[str] = frozenset(), source: str = "") -> ResourcePolicy:
    """Validate a parsed BROKER_RESOURCES_FILE document; ConfigError naming every problem at once."""
    where = source or "BROKER_RESOURCES_FILE"
    if isinstance(document, Mapping) and set(document) == {"resources"}:
        document = document["resources"]
    if document is None:
        document = []
    if not isinstance(document, list):
        raise ConfigError(f"{where}: expected a list of resources (or a mapping with the key `resources`)")
    errors: list[str] = []
    entries: list[ResourceEntry] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(document, 1):
        at = f"{where}: entry {n}"
        if not isinstance(raw, Mapping):
            errors.append(f"{at}: must be a mapping with resource and callers")
            continue
        unknown = sorted(str(k) for k in set(raw) - _FIELDS)
        if unknown:
            errors.append(f"{at}: unknown field(s) {', '.join(unknown)}")
        resource = raw.get("resource")
        normalised = None
        if not isinstance(resource, str):
            errors.append(f"{at}: resource is required (a URI)")
        else:
            try:
                normalised = normalise_resource(resource)
            except ValueError as exc:
                errors.append(f"{at}: resource {resource!r} {exc}")
        if normalised is not None:
            if normalised in seen:
                errors.append(f"{at}: resource {resource!r} is listed already in entry {seen[normalised]}")
            seen[normalised] = n
        texts = {}
        for name in ("audience", "scope"):
            value = raw.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str) or any(ord(c) < 0x20 for c in value):
                errors.append(f"{at}: {name} must be a string")
                value = ""
            texts[name] = value.strip()
        callers = raw.get("callers")
        parsed: set[str] = set()
        if not isinstance(callers, list) or not callers:
            errors.append(f"{at}: callers must be a non-empty list of identities (uri:, dns:, token:)")
        else:
            for c in callers:
                try:
                    identity = parse_allowed(str(c).strip())
                except ValueError as exc:
                    errors.append(f"{at}: caller {exc}")
                    continue
                if allowed_callers and identity not in allowed_callers:
                    errors.append(f"{at}: caller {identity} is not admitted by BROKER_ALLOWED_CALLERS")
                parsed.add(identity)
        if isinstance(resource, str) and normalised is not None:
            entries.append(ResourceEntry(resource, texts["audience"], texts["scope"], frozenset(parsed)))
    if errors:
        raise ConfigError("invalid resource policy:\n  " + "\n  ".join(errors))
    return ResourcePolicy(entries)
