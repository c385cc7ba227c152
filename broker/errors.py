"""The broker's one error tree. Adapters translate driver and HTTP exceptions into it; the servicer maps it out.

    BrokerError
    ├── ConfigError              a bad setting; the message names every bad variable (exit 2)
    ├── MigrationRefused         `migrate` found the database unsafe; the message says what to run
    ├── KeysRejected             (postgres.dbcrypt) the keys do not match dbcrypt_keys: no start
    ├── DecryptFailed            (postgres.dbcrypt) a stored value cannot be decrypted; caught by the codec,
    │                            which marks the link unreadable                   -> STORE_UNAVAILABLE
    ├── StoreUnavailable         PostgreSQL failed, timed out or refused            -> STORE_UNAVAILABLE
    ├── RefreshLockTimeout       another holder kept the per-link lock too long    -> IDP_UNAVAILABLE
    ├── RefreshInFlight          a live holder elsewhere has this refresh token at the IdP -> IDP_UNAVAILABLE
    ├── IdpNotConfigured         no IdP, so an expired token cannot be renewed      -> EXPIRED
    ├── IdpRejected              invalid_grant (or invalid_client ...)              -> REAUTH_REQUIRED
    ├── ExchangeDenied           the IdP refused a token exchange (invalid_target ...) -> EXCHANGE_DENIED
    ├── SubjectTokenRejected     the IdP called the login token (subject) invalid: refresh once, retry once
    └── IdpUnavailable           down, slow, 429/5xx, circuit open                  -> IDP_UNAVAILABLE
        └── IdpOutcomeUnknown    the request may have reached the IdP and rotated the token (timeout after
                                 sending, an unreadable 2xx): the in-flight marker is kept

Outside the tree, because they never leave the gRPC edge (broker.server):

    Exception
    ├── server.entry.Rejected    an RPC refused with a gRPC status (servicer, gatekeeper); the entry point
    │                            records the call, then sends the status
    └── ValueError
        └── server.mesh.MalformedHeader   an XFCC header that does not parse: logged, the call has no identity

Messages never carry a token, a refresh token, a client secret or a DSN password.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is invalid; the message names every bad variable."""


class MigrationRefused(BrokerError):
    """`migrate` found the database unsafe or in a state it cannot fix; the message says what to do."""


class StoreUnavailable(BrokerError):
    """The database failed: unreachable, timed out, or refused (including a missing elevation grant)."""


class RefreshLockTimeout(BrokerError):
    """Another holder kept the per-link refresh lock longer than the bounded wait. Not a credential failure."""


class RefreshInFlight(BrokerError):
    """A live holder (another replica, or this one before a restart of the flight) has sent this very refresh
    token and has not written the answer yet; sending it again could revoke the grant."""


class IdpUnavailable(BrokerError):
    """The identity provider is unreachable, timed out, answered 5xx/429 or garbage, or its circuit is open.

    `retry_after` is the IdP's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdpOutcomeUnknown(IdpUnavailable):
    """The refresh request may have been processed (and the refresh token rotated) although no usable answer
    came back. Not the same as "not rotated": the in-flight marker stays."""


class IdpRejected(BrokerError):
    """The identity provider refused the refresh grant: invalid_grant, or invalid_client/unauthorized_client."""

    def __init__(self, error: str, description: str | None = None) -> None:
        super().__init__(f"identity provider rejected the refresh: {error}")
        self.error = error
        self.description = description


class ExchangeDenied(BrokerError):
    """The identity provider refused a token exchange (RFC 8693) for a resource, or answered something that is not a
    Bearer access token. `error` is the OAuth error code (or what was wrong), never a token."""

    def __init__(self, error: str) -> None:
        super().__init__(f"identity provider refused the token exchange: {error}")
        self.error = error


class SubjectTokenRejected(BrokerError):
    """The identity provider called the subject token (the user's login access token) invalid in a token exchange:
    invalid_grant, or invalid_request naming the subject token."""

    def __init__(self, error: str) -> None:
        super().__init__(f"identity provider refused the subject token: {error}")
        self.error = error


class IdpNotConfigured(BrokerError):
    """No identity provider is configured, so an expired token cannot be renewed."""
