"""Caller identity from a service mesh's sidecar: Envoy/Istio's x-forwarded-client-cert (XFCC) or Linkerd's
l5d-client-id, trusted only on connections that come from the local sidecar (a configured set of loopback peers).

The sidecar terminates mutual TLS and forwards plain text from the pod's loopback; the identity it verified then
feeds exactly what a client certificate's SANs feed: the allowlist, the per-caller limit, the audit line. A header
from any other peer is ignored (logged once, counted): a caller that is not the sidecar can never claim an identity.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("broker.auth")


class MalformedHeader(ValueError):
    """The XFCC header is not well formed, or its last element is not one the sidecar can have written."""


#: The keys Envoy writes, in the order it writes them (By, Hash, then set_current_client_cert_details: Cert, Chain,
#: Subject, URI, DNS). Those it writes once; the others once per SAN.
_ORDER = {"by": 0, "hash": 1, "cert": 2, "chain": 3, "subject": 4, "uri": 5, "dns": 6}
_ONCE = frozenset({"hash", "cert", "chain", "subject"})
#: Envoy writes these values as they are in the certificate, unquoted; a quote in one is never the sidecar's.
_UNQUOTED = frozenset({"by", "hash", "uri", "dns"})

#: A SPIFFE ID (spiffe.io's SPIFFE-ID spec): a lower-case trust domain, then path segments of letters, digits, `.`,
#: `-` and `_`, none of them `.` or `..`. Nothing else may be a `URI=` identity.
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
#: A DNS SAN: letter-digit-hyphen labels (a leading `*.` for a wildcard), at most 253 characters.
_DNS_NAME = re.compile(
    r"(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_KEY = re.compile(r"[A-Za-z]+")


def _quoted(header: str, i: int) -> tuple[str, int]:
    """The quoted string that starts at header[i] (a `"`), unescaped, and the index after its closing quote."""
    out: list[str] = []
    i += 1
    while i < len(header):
        ch = header[i]
        if ch == "\\" and i + 1 < len(header):
            out.append(header[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise MalformedHeader("unterminated quote")


def parse_xfcc(header: str) -> list[list[tuple[str, str, bool]]]:
    """The elements of an XFCC header, each a list of (key lower-cased, value, whether it was quoted). A quoted value
    is one quoted string from `=` to the next separator: text after its closing quote is malformed, not glued on."""
    elements: list[list[tuple[str, str, bool]]] = []
    pairs: list[tuple[str, str, bool]] = []
    i, n = 0, len(header)
    while i <= n:
        eq = header.find("=", i)
        stop = min(j for j in (header.find(";", i), header.find(",", i), n) if j >= 0)
        if eq < 0 or eq > stop:
            if header[i:stop].strip():
                raise MalformedHeader("a pair without key=value")
        else:
            key = header[i:eq].strip()
            if not _KEY.fullmatch(key):
                raise MalformedHeader("a pair without a key")
            j = eq + 1
            while j < n and header[j] in " \t":
                j += 1
            if j < n and header[j] == '"':
                value, j = _quoted(header, j)
                while j < n and header[j] in " \t":
                    j += 1
                if j < n and header[j] not in ";,":
                    raise MalformedHeader("text after a quoted value")
                pairs.append((key.lower(), value, True))
                stop = j
            else:
                value = header[j:stop].strip()
                if '"' in value:
                    raise MalformedHeader("a quote inside an unquoted value")
                pairs.append((key.lower(), value, False))
        if stop >= n or header[stop] == ",":
            if pairs:
                elements.append(pairs)
            pairs = []
        i = stop + 1
    if not elements:
        raise MalformedHeader("empty")
    return elements


def _is_spiffe_id(value: str) -> bool:
    return len(value) <= 2048 and bool(_SPIFFE_ID.fullmatch(value)) and not _DOT_SEGMENT.search(value)


def _is_dns_name(value: str) -> bool:
    return len(value.rstrip(".")) <= 253 and bool(_DNS_NAME.fullmatch(value.rstrip(".")))


def element_identities(element: list[tuple[str, str, bool]]) -> list[str]:
    """The identity of one element as the sidecar writes it: its SPIFFE ID (`uri:`) when it has one, else its DNS
    names (`dns:`). An element the sidecar cannot have written is refused (MalformedHeader): an unknown key, keys out
    of Envoy's order or repeated, a quoted URI/DNS/By/Hash, more than one URI (an X.509 SVID has exactly one URI SAN;
    a second one is a `;URI=` inside the first), a URI that is not a SPIFFE ID, a DNS= that is not a DNS name.

    DNS names do not count next to a SPIFFE ID: Envoy writes SANs unquoted, so a certificate's URI SAN ending in
    `;DNS=...` would otherwise add a name that no CA issued."""
    rank = -1
    seen: set[str] = set()
    uris: list[str] = []
    names: list[str] = []
    for key, value, quoted in element:
        if key not in _ORDER:
            raise MalformedHeader(f"unknown key {key!r}" if len(key) <= 16 else "an unknown key")
        if _ORDER[key] < rank or (key in _ONCE and key in seen):
            raise MalformedHeader(f"{key} out of order or repeated")
        rank = _ORDER[key]
        seen.add(key)
        if quoted and key in _UNQUOTED:
            raise MalformedHeader(f"a quoted {key}")
        if key == "uri":
            uris.append(value)
        elif key == "dns":
            if not _is_dns_name(value):
                raise MalformedHeader("a DNS= value that is not a DNS name")
            names.append(value)
    if len(uris) > 1:
        raise MalformedHeader("more than one URI=")
    if uris and uris[0]:  # Envoy writes an empty URI= for a certificate without a URI SAN
        if not _is_spiffe_id(uris[0]):
            raise MalformedHeader("a URI= value that is not a SPIFFE ID")
        return [f"uri:{uris[0]}"]
    return [f"dns:{name}" for name in names]


def xfcc_identities(header: str) -> list[str]:
    """The identity of the element the local sidecar appended: the last one (see element_identities)."""
    return element_identities(parse_xfcc(header)[-1])


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
        self._warned_malformed = False

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
            if not self._warned_malformed:
                self._warned_malformed = True
                log.warning("refusing x-forwarded-client-cert from the sidecar (%s): no identity (logged once)", exc)
            return []
