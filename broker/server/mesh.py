"""Caller identity from a service mesh's sidecar: Envoy/Istio's x-forwarded-client-cert (XFCC) or Linkerd's
l5d-client-id, trusted only on connections that come from the local sidecar (a configured set of loopback peers).

The sidecar terminates mutual TLS and forwards plain text from the pod's loopback; the identity it verified then
feeds exactly what a client certificate's SANs feed: the allowlist, the per-caller limit, the audit line. A header
from any other peer is ignored (logged once, counted): a caller that is not the sidecar can never claim an identity.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("broker.auth")

MODES = ("none", "xfcc", "l5d")
#: Where a local sidecar's connections come from: Linkerd's proxy and Envoy with localhost forwarding use the
#: loopback address; Istio's inbound passthrough uses 127.0.0.6 as the source of the forwarded connection.
DEFAULT_TRUSTED_PEERS = ("127.0.0.1", "::1", "127.0.0.6")


class MalformedHeader(ValueError):
    """The XFCC header is not well formed."""


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes (a backslash escapes inside quotes)."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise MalformedHeader("unterminated quote")
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out, escaped = [], False
        for ch in value[1:-1]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            else:
                out.append(ch)
        return "".join(out)
    return value


def parse_xfcc(header: str) -> list[list[tuple[str, str]]]:
    """The elements of an XFCC header, each a list of (key lower-cased, value) pairs."""
    elements = []
    for element in _split(header, ","):
        pairs = []
        for pair in _split(element, ";"):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise MalformedHeader("a pair without key=value")
            pairs.append((key.strip().lower(), _unquote(value)))
        if pairs:
            elements.append(pairs)
    if not elements:
        raise MalformedHeader("empty")
    return elements


def xfcc_identities(header: str) -> list[str]:
    """`uri:` and `dns:` identities of the element the local sidecar appended: the last one."""
    last = parse_xfcc(header)[-1]
    return [f"uri:{v}" for k, v in last if k == "uri" and v] + [f"dns:{v}" for k, v in last if k == "dns" and v]


def peer_host(peer: str) -> str | None:
    """The IP address of a gRPC peer string (ipv4:127.0.0.1:5000, ipv6:[::1]:5000), else None."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class MeshIdentity:
    """Reads the caller's identity from the sidecar's header, on trusted peers only."""

    def __init__(self, mode: str, trusted_peers: Sequence[str], on_untrusted: Callable[[], None]) -> None:
        self._header = {"xfcc": "x-forwarded-client-cert", "l5d": "l5d-client-id"}[mode]
        self._mode = mode
        self._trusted = frozenset(str(ipaddress.ip_address(p)) for p in trusted_peers)
        self._on_untrusted = on_untrusted
        self._warned = False

    def identities(self, peer: str, metadata: Sequence[tuple[str, Any]]) -> list[str]:
        value = next((str(v) for k, v in metadata if k == self._header), None)
        if value is None:
            return []
        if peer_host(peer) not in self._trusted:
            self._on_untrusted()
            if not self._warned:
                self._warned = True
                log.warning(
                    "ignoring %s from %s: only the local sidecar's connections are trusted (logged once)",
                    self._header,
                    peer,
                )
            return []
        if self._mode == "l5d":
            return [f"dns:{value.strip()}"] if value.strip() else []
        try:
            return xfcc_identities(value)
        except MalformedHeader as exc:
            log.warning("malformed x-forwarded-client-cert from the sidecar (%s): no identity", exc)
            return []
