"""The small interfaces the domain talks to. Adapters (store.py, idp.py, metrics.py, auth.py) implement them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from broker.errors import BrokerError
from broker.model import CachedExchange, DbKey, ExchangedToken, Link, RefreshedTokens, Secret

ExchangeKey = tuple[str, str, str]  # (resource as the policy names it, audience, scope)

if TYPE_CHECKING:  # broker.refresh imports this module
    from broker.core.refresh.schedule import Note


class LockedLink(Protocol):
    """A link read under the per-link refresh lock; the lock is held until the context exits."""

    link: Link | None

    async def save(self, tokens: RefreshedTokens) -> bool:
        """Write refreshed tokens inside the locked transaction; committed when the context exits cleanly."""
        ...

    async def mark_in_flight(self) -> None:
        """Record, committed at once and visible to every replica, that the link's refresh token goes to the IdP
        (taking over a dead holder's record for the same token)."""
        ...

    async def clear_in_flight(self) -> None:
        """Lift that record (only the one for this link's refresh token) after the IdP said it did not rotate."""
        ...

    async def note_forced(self) -> None:
        """Record, in the locked transaction, that this refresh was forced by an upstream's rejection."""
        ...

    async def note_written(self, note: Note) -> None:
        """Record, in the locked transaction, the refresh token being written (its SHA-256) and its next background
        refresh, so that no replica takes this broker's own rotation for a foreign one."""

    async def note_reauth_required(self, error: str, *, forced: bool) -> bool:
        """Record, in the locked transaction, that the link needs a new login (the IdP answered `error` for its
        current refresh token), with its link.reauth_required event. False when that was recorded already."""
        ...

    async def note_recovered(self, fingerprint: bytes, how: str) -> bool:
        """Lift, in the locked transaction, the re-auth-required state recorded for `fingerprint`, with its
        link.recovered event. False when another did."""
        ...


class LinkStore(Protocol):
    """Reads and writes OIDC links under the elevated database role."""

    async def get_link(self, user_id: UUID, *, timeout: float) -> Link | None: ...

    def lock_link(
        self, user_id: UUID, *, lock_timeout: float, hold_timeout: float
    ) -> AbstractAsyncContextManager[LockedLink]: ...

    async def save_refreshed(self, previous: Link, tokens: RefreshedTokens, *, timeout: float) -> bool:
        """Write refreshed tokens outside any lock, only where the row still holds previous's refresh token as it was
        read (or already holds the new one); True when the row holds the new tokens afterwards."""
        ...

    async def dbcrypt_keys(self, *, timeout: float) -> list[DbKey]:
        """The product's dbcrypt_keys rows (digests and test values), for the start-up check of the keys."""
        ...

    async def heartbeat(self, held: Sequence[tuple[UUID, Secret]], *, timeout: float) -> None:
        """Mark these in-flight records (user id, refresh token sent) as held by a live process, now."""
        ...

    async def ping(self, *, timeout: float) -> bool:
        """Whether the database answers (readiness)."""
        ...

    async def remember_rejected(self, user_id: UUID, access_sha256: bytes, *, timeout: float) -> None:
        """Remember, for every worker and replica, that an upstream rejected the user's access token with this
        SHA-256: reads then mark the link `access_rejected` for as long as it holds that token."""

    async def note_reauth_required(self, link: Link, error: str, *, forced: bool, timeout: float) -> bool:
        """Record, on its own, that `link` (as read) needs a new login, with its event; False when recorded already."""
        ...

    async def note_recovered(self, user_id: UUID, fingerprint: bytes, how: str, *, timeout: float) -> bool:
        """Lift the re-auth-required state recorded for `fingerprint`, with its event; False when another did."""
        ...


class IdentityProvider(Protocol):
    """Performs the OAuth2 refresh_token grant."""

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens: ...


class LockedExchange(Protocol):
    """The (user, resource) exchange row under a lock every replica takes before exchanging; held until exit."""

    cached: CachedExchange | None

    async def save(self, subject_sha256: bytes, token: ExchangedToken, *, forced: bool) -> None:
        """Cache the exchanged token (encrypted at rest when keys are configured) for this login token."""
        ...

    async def deny(self, subject_sha256: bytes, seconds: float, error: str) -> None:
        """Remember that the IdP refused this login token's exchange, for `seconds`."""
        ...


class ExchangeStore(Protocol):
    """The broker's cache of exchanged tokens, shared by every replica."""

    async def get_link_and_exchanged(
        self, user_id: UUID, key: ExchangeKey, *, timeout: float
    ) -> tuple[Link | None, CachedExchange | None]:
        """The user's link and the row for `key`, in one round trip (as LinkStore.get_link reads the link)."""
        ...

    def lock_exchanged(
        self, user_id: UUID, key: ExchangeKey, *, lock_timeout: float, hold_timeout: float
    ) -> AbstractAsyncContextManager[LockedExchange]: ...


class TokenExchanger(Protocol):
    """Performs the RFC 8693 token exchange at the IdP. Raises ExchangeDenied, SubjectTokenRejected or
    IdpUnavailable."""

    async def exchange(self, subject: Secret, resource: str, audience: str, scope: str) -> ExchangedToken: ...


class GuardedIdp(IdentityProvider, Protocol):
    """An IdentityProvider that can tell, without a call, that it would refuse one (an open circuit, no IdP)."""

    def refusal(self) -> BrokerError | None:
        """The error a call would end with right now, or None when a call may go out."""
        ...


class RefreshObserver(Protocol):
    """What the refresher reports for metrics; a no-op implementation is fine."""

    def refresh_finished(self, result: str, seconds: float) -> None: ...

    def lock_waited(self, seconds: float) -> None: ...

    def inflight(self, delta: int) -> None: ...

    def persist_failed(self) -> None: ...

    def circuit_state(self, state: int) -> None: ...

    def forced_refresh(self, result: str) -> None: ...

    def link_event(self, event_type: str) -> None:
        """A link event was written (committed with the state it records)."""
        ...


class ExchangeObserver(Protocol):
    """What the exchange reports for metrics; a no-op implementation is fine."""

    def exchange_finished(self, result: str, seconds: float) -> None: ...

    def exchange_cache_hit(self) -> None: ...


class NullObserver:
    """A RefreshObserver that records nothing."""

    def refresh_finished(self, result: str, seconds: float) -> None:
        pass

    def lock_waited(self, seconds: float) -> None:
        pass

    def inflight(self, delta: int) -> None:
        pass

    def persist_failed(self) -> None:
        pass

    def circuit_state(self, state: int) -> None:
        pass

    def forced_refresh(self, result: str) -> None:
        pass

    def exchange_finished(self, result: str, seconds: float) -> None:
        pass

    def exchange_cache_hit(self) -> None:
        pass

    def link_event(self, event_type: str) -> None:
        pass


class Gatekeeper(Protocol):
    """Decides whether a caller may call the token service (implemented in broker.auth)."""

    async def admit(self, context: Any, metadata: Sequence[tuple[str, Any]]) -> tuple[str | None, Callable[[], None]]:
        """Return (caller identity, release callback), or raise broker.calls.Rejected."""
        ...

    async def admit_watcher(self, context: Any, metadata: Sequence[tuple[str, Any]]) -> str:
        """The identity of a caller allowed to watch link events, or raise Rejected."""
        ...
