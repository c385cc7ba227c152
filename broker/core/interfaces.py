"""The small interfaces the domain talks to. Adapters (store.py, idp.py, metrics.py, auth.py) implement them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol
from uuid import UUID

from broker.errors import BrokerError
from broker.model import DbKey, Link, RefreshedTokens, Secret


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

    async def note_reauth_required(self, link: Link, error: str, *, forced: bool, timeout: float) -> bool:
        """Record, on its own, that `link` (as read) needs a new login, with its event; False when recorded already."""
        ...

    async def note_recovered(self, user_id: UUID, fingerprint: bytes, how: str, *, timeout: float) -> bool:
        """Lift the re-auth-required state recorded for `fingerprint`, with its event; False when another did."""
        ...


class IdentityProvider(Protocol):
    """Performs the OAuth2 refresh_token grant."""

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens: ...


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
