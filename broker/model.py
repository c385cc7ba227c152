"""Value types of the domain: secrets that never print, the stored link, and the outcome of a token request."""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID


class Secret:
    """A credential whose repr and str are redacted; `reveal()` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def sha256(self) -> bytes:
        """SHA-256 of the value: what callers report of a rejected access token, and the markers store."""
        return hashlib.sha256(self._value.encode()).digest()

    def fingerprint(self) -> str:
        """A short, non-reversible id for memory keys and debugging; never the value."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:16]

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


class AccountState(enum.Enum):
    """The owning user's state in the product's `users` table, when the database has one."""

    ACTIVE = "active"
    DISABLED = "disabled"  # suspended or deleted


@dataclass(frozen=True, slots=True)
class Link:
    """A user's stored OIDC link. `expiry` None means the token never expires (the product's zero time)."""

    user_id: UUID
    access_token: Secret
    refresh_token: Secret
    expiry: datetime | None
    account: AccountState = AccountState.ACTIVE
    unreadable: str | None = None  # why the stored tokens cannot be used (encrypted, no or a wrong key); never a value
    refresh_stored: str | None = None  # the refresh token exactly as stored (ciphertext when encrypted at rest); the
    # write-back's compare-and-set matches on it. None: stored as it is (plain text).

    @property
    def refresh_as_stored(self) -> str:
        return self.refresh_token.reveal() if self.refresh_stored is None else self.refresh_stored

    marker_idle_seconds: float | None = None  # this refresh token is at the IdP (in-flight marker); seconds since
    # its holder's last heartbeat. Only read under the refresh lock.
    forced_seconds_ago: float | None = None  # the last refresh forced by an upstream's rejection; under the lock
    access_rejected: bool = False  # an upstream rejected this very access token (remembered in the database until
    # the link holds another one): it is never served
    reauth_fingerprint: bytes | None = None  # the link is recorded as needing a new login, for the tokens with this
    # fingerprint (see `fingerprint`); while they are still the link's, nothing is sent to the IdP

    def fingerprint(self) -> bytes:
        """SHA-256 over the SHA-256s of the access and refresh tokens: what the recorded re-auth-required state
        names the link's tokens by (a new login changes it). Never reversible to a token."""
        return hashlib.sha256(self.access_token.sha256() + self.refresh_token.sha256()).digest()

    @property
    def known_dead(self) -> bool:
        """Recorded as needing a new login, and its tokens are still those it was recorded for."""
        return self.reauth_fingerprint is not None and self.reauth_fingerprint == self.fingerprint()


@dataclass(frozen=True, slots=True)
class RefreshedTokens:
    """What the identity provider returned for a refresh grant, normalised."""

    access_token: Secret
    refresh_token: Secret
    expiry: datetime | None


#: The link events (issue 25): one per change of a link's recorded state.
REAUTH_REQUIRED = "link.reauth_required"
RECOVERED = "link.recovered"
EVENT_TYPES = (REAUTH_REQUIRED, RECOVERED)


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """One link event as written to the outbox. Never a token, a token hash or a client secret."""

    id: int
    type: str  # REAUTH_REQUIRED or RECOVERED
    user_id: UUID
    occurred_at: datetime
    error: str = ""  # link.reauth_required: the IdP's error code (invalid_grant), or no_refresh_token
    forced: bool = False  # link.reauth_required: it came from a refresh forced by an upstream's rejection
    recovered_by: str = ""  # link.recovered: login (new tokens seen) or refresh (a refresh succeeded)
    attempts: int = 0  # webhook delivery attempts so far, this one included


def utcnow() -> datetime:
    return datetime.now(UTC)


class TokenStatus(enum.Enum):
    """Why a token (or no token) was returned; mirrors broker.v1.TokenStatus."""

    VALID = "valid"
    REFRESHED = "refreshed"
    NO_LINK = "no_link"
    EXPIRED = "expired"
    REAUTH_REQUIRED = "reauth_required"
    IDP_UNAVAILABLE = "idp_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    ACCOUNT_DISABLED = "account_disabled"
    EXCHANGE_DENIED = "exchange_denied"


@dataclass(frozen=True, slots=True)
class TokenResult:
    """The answer to one token request. `access_token` is empty for every status but VALID and REFRESHED."""

    status: TokenStatus
    access_token: Secret = Secret("")  # noqa: RUF009 - Secret is immutable
    expiry: datetime | None = None
    refreshed: bool = False  # this request caused or joined a refresh at the IdP
    failure: TokenStatus | None = None  # a VALID answer that is a fallback after this failure (never sent out)
    exchange: str | None = None  # for a resource: "exchanged" (at the IdP for this answer) or "cached"

    @staticmethod
    def empty(status: TokenStatus) -> TokenResult:
        return TokenResult(status)


@dataclass(frozen=True, slots=True)
class ExchangedToken:
    """What the identity provider issued in a token exchange for one resource. `expiry` None: lifetime unknown."""

    access_token: Secret
    expiry: datetime | None


@dataclass(frozen=True, slots=True)
class CachedExchange:
    """The broker's row for (user, resource, audience, scope): the exchanged token and the login token it came from
    (its SHA-256), or a remembered denial."""

    access_token: Secret
    expiry: datetime | None
    lifetime_seconds: float | None  # expiry - the moment it was exchanged
    subject_sha256: bytes
    denied_seconds: float | None = None  # a denial for this subject is remembered this much longer
    forced_seconds_ago: float | None = None  # the last re-exchange forced by an upstream's rejection
    unreadable: str | None = None  # why the stored token cannot be used (encrypted, no or a wrong key)


@dataclass(frozen=True)
class DbKey:
    """A row of the product's dbcrypt_keys, as the broker reads it."""

    active_digest: str | None
    revoked_digest: str | None
    test: str


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def parse_sha256_hex(text: str) -> bytes:
    """A SHA-256 digest written in hex (64 characters, either case) as bytes; ValueError for anything else. The one
    rule for a caller token's digest in BROKER_CALLER_TOKENS_FILE and a reported rejected token."""
    if len(text) != 64 or not _SHA256_HEX.fullmatch(text):
        raise ValueError("not a SHA-256 hex digest")
    return bytes.fromhex(text)
