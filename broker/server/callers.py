"""Caller authentication and authorisation for the token service, decided before any database access.

Every identity has a kind, and the allowlist names the kind too, so one kind can never stand in for another:
- `uri:<URI SAN>` of the verified client certificate (a SPIFFE ID, say);
- `dns:<DNS SAN>` of the verified client certificate;
- `token:<name>` of a bearer caller token listed in BROKER_CALLER_TOKENS_FILE as `name:sha256-hex`, compared in
  constant time.
Other SAN kinds (email, IP) are not identities.
No identity: UNAUTHENTICATED. An identity not in BROKER_ALLOWED_CALLERS: PERMISSION_DENIED.
Over BROKER_MAX_CONCURRENT_PER_CALLER in-flight calls: RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from broker.errors import ConfigError
from broker.model import parse_sha256_hex
from broker.server.entry import Rejected, record_identities
from broker.server.mesh import MeshIdentity, peer_host

log = logging.getLogger("broker.auth")

#: The auth-context properties gRPC core fills from a verified client certificate, by SAN kind.
_SAN_KINDS = (("peer_uri", "uri"), ("peer_dns", "dns"))


def load_caller_tokens(path: Path) -> dict[str, bytes]:
    """name -> sha256 digest. Blank lines and # comments are ignored; a malformed line is a configuration error."""
    tokens: dict[str, bytes] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = line.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError(name)
            tokens[name] = parse_sha256_hex(digest)
        except ValueError:
            raise ConfigError(f"BROKER_CALLER_TOKENS_FILE line {n}: expected name:sha256-hex-of-token") from None
    return tokens


class CallerTokens:
    """The tokens file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = (0, 0)
        self._tokens: dict[str, bytes] = {}
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = self._path.stat()
        except OSError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._tokens = load_caller_tokens(self._path)
                self._stamp = stamp
            except (ConfigError, OSError) as exc:
                log.error("caller tokens file not reloaded: %s", exc)

    def identify(self, presented: str) -> str | None:
        """The name whose digest matches, checking every entry so timing does not reveal which one matched."""
        self._refresh()
        digest = hashlib.sha256(presented.encode()).digest()
        found: str | None = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def certificate_identities(context: Any) -> list[str]:
    """`uri:` and `dns:` identities from the verified client certificate's SANs (empty without mutual TLS)."""
    auth = context.auth_context() or {}
    return [
        f"{kind}:{v.decode() if isinstance(v, bytes) else v}" for prop, kind in _SAN_KINDS for v in auth.get(prop, [])
    ]


class CallerGate:
    """The Gatekeeper (broker.ports) used in production."""

    def __init__(
        self,
        *,
        require_identity: bool,
        allowed: frozenset[str],
        tokens: CallerTokens | None,
        max_concurrent: int,
        mesh: MeshIdentity | None = None,
        watchers: frozenset[str] = frozenset(),
    ) -> None:
        self._mesh = mesh
        self._watchers = watchers
        self._require = require_identity
        self._allowed = allowed
        self._tokens = tokens
        self._max = max_concurrent
        self._inflight: Counter[str] = Counter()

    async def admit(self, context: Any, metadata: Sequence[tuple[str, Any]]) -> tuple[str | None, Callable[[], None]]:
        identities = self._identities(context, metadata)
        record_identities(identities)
        caller = self._pick(identities)
        if self._allowed and caller is None:
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "caller is not allowed to request tokens")
        # Anonymous callers (loopback, or BROKER_ALLOW_INSECURE) are limited per source address.
        key = caller or (identities[0] if identities else _source(context.peer()))
        if self._inflight[key] >= self._max:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent requests from this caller")
        self._inflight[key] += 1

        def release() -> None:
            self._inflight[key] -= 1
            if self._inflight[key] <= 0:
                del self._inflight[key]

        return key if identities else None, release

    async def admit_watcher(self, context: Any, metadata: Sequence[tuple[str, Any]]) -> str:
        """A WatchLinkEvents caller: one of BROKER_EVENT_WATCHERS (empty: nobody). No concurrency limit: a stream
        stays open for as long as its watcher runs."""
        identities = self._identities(context, metadata)
        for identity in identities:
            if identity in self._watchers:
                return identity
        raise Rejected(grpc.StatusCode.PERMISSION_DENIED, "caller is not allowed to watch link events")

    def _identities(self, context: Any, metadata: Sequence[tuple[str, Any]]) -> list[str]:
        """Every identity the call proves; UNAUTHENTICATED for a bad caller token, or none where one is required."""
        identities = certificate_identities(context)
        if self._mesh is not None:
            identities += self._mesh.identities(context.peer(), metadata)
        bearer = next((str(v) for k, v in metadata if k == "authorization"), None)
        if bearer is not None and self._tokens is not None:
            scheme, _, value = bearer.partition(" ")
            name = self._tokens.identify(value.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "invalid caller token")
            identities.append(f"token:{name}")
        if not identities and self._require:
            raise Rejected(
                grpc.StatusCode.UNAUTHENTICATED, "caller identity required: a client certificate or a caller token"
            )
        return identities

    def _pick(self, identities: list[str]) -> str | None:
        """The first identity the allowlist names; with no allowlist, the first identity at all."""
        if not self._allowed:
            return identities[0] if identities else None
        for identity in identities:
            if identity in self._allowed:
                return identity
        return None


def _source(peer: str) -> str:
    """The source address of a gRPC peer (its IP; a unix socket peer as it is), without the port."""
    return peer_host(peer) or peer
