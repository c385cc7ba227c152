"""Caller authentication and authorisation for the token service, decided before any database access.

Identities come from the client certificate (URI SANs such as SPIFFE IDs, and DNS SANs) or from a static bearer
caller token listed in BROKER_CALLER_TOKENS_FILE as `name:sha256-hex`, compared in constant time.
No identity: UNAUTHENTICATED. An identity not in BROKER_ALLOWED_CALLERS: PERMISSION_DENIED.
Over BROKER_MAX_CONCURRENT_PER_CALLER in-flight calls: RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from broker.errors import ConfigError
from broker.interceptors import Gatekeeper

log = logging.getLogger("broker.auth")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SAN_KEY = "x509_subject_alternative_name"


def load_caller_tokens(path: Path) -> dict[str, bytes]:
    """name -> sha256 digest. Blank lines and # comments are ignored; a malformed line is a configuration error."""
    tokens: dict[str, bytes] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = line.rpartition(":")
        digest = digest.lower()
        if not sep or not name or not _HEX64.fullmatch(digest):
            raise ConfigError(f"BROKER_CALLER_TOKENS_FILE line {n}: expected name:sha256-hex-of-token")
        tokens[name] = bytes.fromhex(digest)
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


def _peer_host(peer: str) -> str:
    """Anonymous callers (loopback or BROKER_ALLOW_INSECURE) are limited per source address, e.g. ipv4:10.0.0.1."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def certificate_identities(context: Any) -> list[str]:
    """URI and DNS SANs of the verified client certificate (empty without mutual TLS)."""
    auth = context.auth_context() or {}
    return [v.decode() if isinstance(v, bytes) else str(v) for v in auth.get(_SAN_KEY, [])]


class CallerGate(Gatekeeper):
    """The Gatekeeper used in production."""

    def __init__(
        self,
        *,
        require_identity: bool,
        allowed: frozenset[str],
        tokens: CallerTokens | None,
        max_concurrent: int,
    ) -> None:
        self._require = require_identity
        self._allowed = allowed
        self._tokens = tokens
        self._max = max_concurrent
        self._inflight: Counter[str] = Counter()

    async def admit(self, context: Any, metadata: tuple[tuple[str, Any], ...]) -> tuple[str | None, Callable[[], None]]:
        identities = certificate_identities(context)
        bearer = next((str(v) for k, v in metadata if k == "authorization"), None)
        if bearer is not None and self._tokens is not None:
            scheme, _, value = bearer.partition(" ")
            name = self._tokens.identify(value.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid caller token")
            identities.append(f"token:{name}")
        if not identities and self._require:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "caller identity required: a client certificate or a caller token"
            )
        caller = self._pick(identities)
        if self._allowed and caller is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caller is not allowed to request tokens")
        key = caller or (identities[0] if identities else _peer_host(context.peer()))
        if self._inflight[key] >= self._max:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent requests from this caller")
        self._inflight[key] += 1

        def release() -> None:
            self._inflight[key] -= 1
            if self._inflight[key] <= 0:
                del self._inflight[key]

        return key if identities else None, release

    def _pick(self, identities: list[str]) -> str | None:
        """The first identity the allowlist names; with no allowlist, the first identity at all."""
        if not self._allowed:
            return identities[0] if identities else None
        for identity in identities:
            bare = identity.removeprefix("token:")
            if identity in self._allowed or bare in self._allowed:
                return identity
        return None
