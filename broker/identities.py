"""Caller identity names: `uri:`, `dns:` and `token:` kinds, and the allowlist syntax. No I/O, no grpc."""

from __future__ import annotations

IDENTITY_KINDS = ("uri", "dns", "token")


def parse_allowed(entry: str) -> str:
    """One BROKER_ALLOWED_CALLERS entry as `kind:value`. An entry without a kind is accepted only when it is a URI
    (`spiffe://...` means `uri:spiffe://...`); a bare name is ambiguous and refused (ValueError)."""
    kind, sep, value = entry.partition(":")
    if sep and kind in IDENTITY_KINDS and value and not value.startswith("//"):
        return entry
    if "://" in entry:
        return f"uri:{entry}"
    raise ValueError(
        f"{entry!r} has no kind: write dns:{entry} (a client-certificate DNS SAN), uri:... (a URI SAN) or "
        f"token:{entry} (a caller token's name)"
    )
