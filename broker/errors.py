"""The broker's one error tree. Adapters translate driver and HTTP exceptions into it; the servicer maps it out.

Messages never carry a token, a refresh token, a client secret or a DSN password.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is invalid; the message names every bad variable."""


class StoreUnavailable(BrokerError):
    """The database failed: unreachable, timed out, or refused (including a missing elevation grant)."""


class MigrationRefused(BrokerError):
    """`migrate` found the database unsafe or in a state it cannot fix; the message says what to do."""


class RefreshLockTimeout(BrokerError):
    """Another holder kept the per-link refresh lock longer than the bounded wait. Not a credential failure."""


class IdpUnavailable(BrokerError):
    """The identity provider is unreachable, timed out, answered 5xx or garbage, or its circuit is open."""


class IdpRejected(BrokerError):
    """The identity provider refused the refresh grant with an OAuth error such as invalid_grant."""

    def __init__(self, error: str, description: str | None = None) -> None:
        super().__init__(f"identity provider rejected the refresh: {error}")
        self.error = error
        self.description = description


class IdpNotConfigured(BrokerError):
    """No identity provider is configured, so an expired token cannot be renewed."""
