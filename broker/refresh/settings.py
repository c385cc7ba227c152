"""The refresh core's settings, derived once from the broker's Settings (the arithmetic lives here, not in wiring)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from broker.config import Settings, pool_shares


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    leeway: timedelta
    """Refresh when now >= expiry - leeway (capped at half the token's lifetime, see broker.policy)."""
    refresh_ahead: timedelta
    """Serve and refresh in the background this long before the leeway window."""
    lock_timeout: float
    """The most a refresh waits for the per-link row lock, and for a refresh slot in this process."""
    idp_timeout: float
    """The IdP call's own timeout; with the lock timeout it bounds how long the locked transaction stays open."""
    reauth_backoff: float
    """A rejected refresh token is not sent again for this long."""
    forced_interval: float
    """At most one refresh per link forced by an upstream's rejection in this many seconds, across replicas."""
    persist_warn_after: float
    """A write-back still failing after this long is logged as an error and counted; it goes on being retried."""
    store_timeout: float
    """Each database statement outside the locked transaction."""
    max_concurrent: int
    """Refreshes at once in this process (each holds a pooled connection across the IdP call)."""
    heartbeat_interval: float = 0.5
    """How often a live holder refreshes the heartbeat of the in-flight markers it holds."""
    holder_dead_after: float = 2.0
    """A marker whose heartbeat is older than this belongs to a holder that is gone; it is taken over once."""

    @property
    def hold_timeout(self) -> float:
        """How long the locked transaction may stay open: the lock wait, the IdP call, the write, and margins."""
        return self.lock_timeout + self.idp_timeout + 2 * (self.lock_timeout + 1) + 5

    @staticmethod
    def from_settings(s: Settings) -> RefreshSettings:
        return RefreshSettings(
            leeway=timedelta(seconds=s.refresh_leeway),
            refresh_ahead=timedelta(seconds=s.refresh_ahead),
            lock_timeout=s.refresh_lock_timeout,
            idp_timeout=s.oidc_timeout,
            reauth_backoff=s.reauth_backoff,
            forced_interval=s.forced_refresh_interval,
            persist_warn_after=s.persist_retry_seconds,
            store_timeout=s.request_timeout,
            max_concurrent=pool_shares(s.db_pool_max)[1],
        )
