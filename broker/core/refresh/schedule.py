"""The background-refresh schedule's data and arithmetic: what a note of a link says, when a refresh is due, and the
store interface that keeps it (token_broker.refresh_schedule, so every replica agrees and it survives a deploy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

from broker.model import RefreshedTokens


@dataclass(frozen=True, slots=True)
class Note:
    """A link a broker read or wrote. The background refresh is due at GREATEST(expiry - ahead, expiry - lifetime/2)
    (computed by the database, which may know the lifetime from another replica). Never a token: its SHA-256."""

    user_id: UUID
    refresh_sha256: bytes
    expiry: datetime | None
    ahead_seconds: float
    lifetime_seconds: float | None


class ScheduleStore(Protocol):
    async def note(
        self, notes: Sequence[Note], *, seen: bool, log_after: float, timeout: float
    ) -> list[tuple[UUID, bool]]:
        """Record these links (`seen`: a caller asked for them); return the rotations no broker made, each with
        whether it is the user's first within `log_after` seconds."""
        ...

    async def claim_due(
        self, limit: int, *, claim_seconds: float, active_seconds: float, timeout: float
    ) -> list[tuple[UUID, bytes | None]]:
        """Claim (for `claim_seconds`, so other replicas skip them) the active users whose background refresh is due,
        with the SHA-256 of the refresh token the due time was computed for; idle ones are unscheduled."""
        ...

    async def unschedule(self, user_id: UUID, *, timeout: float) -> None: ...

    async def note_written(self, note: Note, *, timeout: float) -> None:
        """Record a refresh token a broker wrote outside the locked transaction (a write-back that landed later)."""
        ...


@dataclass(frozen=True, slots=True)
class BackgroundSettings:
    product_window: float
    """BROKER_PRODUCT_REFRESH_WINDOW: the product refreshes a token that expires within this many seconds (its
    build path); active users' tokens are refreshed before they enter it. 0: no background refresh."""
    active_window: float
    """BROKER_ACTIVE_WINDOW: a user is active when a caller asked for their token within this many seconds."""
    jitter: float
    """BROKER_BACKGROUND_JITTER: up to this many seconds earlier, per user, to spread a fleet's refreshes."""
    claim_seconds: float
    """How long a replica's claim on a due refresh holds (its refresh's lock wait, IdP call and write)."""
    refresh_seconds: float = 0.0
    """The longest a refresh's IdP call takes (BROKER_OIDC_TIMEOUT): it must have landed before the window opens."""
    batch: int = 100
    """Due refreshes claimed per tick and replica."""

    @property
    def enabled(self) -> bool:
        return self.product_window > 0

    @property
    def interval(self) -> float:
        """How often a replica flushes its notes and claims due refreshes: a 60th of the window, within 0.05..10 s."""
        return min(max(self.product_window / 60, 0.05), 10.0)

    @property
    def renote_after(self) -> float:
        """A user seen again with the same refresh token is noted at most this often (active to within a tenth)."""
        return self.active_window / 10

    def ahead(self, user_id: UUID) -> float:
        """How long before expiry an active user's token is refreshed: the product's window, two ticks (the refresh
        starts at most a tick late), the IdP call's timeout (it has landed before the window opens), and the user's
        jitter, fixed by the user id so that every replica agrees."""
        share = int.from_bytes(user_id.bytes[:4], "big") / 2**32
        return self.product_window + 2 * self.interval + self.refresh_seconds + self.jitter * share

    def written(self, user_id: UUID, tokens: RefreshedTokens, now: datetime) -> Note:
        """The note of tokens a broker is writing: their lifetime is known exactly (expiry - now)."""
        lifetime = None if tokens.expiry is None else (tokens.expiry - now).total_seconds()
        return Note(user_id, tokens.refresh_token.sha256(), tokens.expiry, self.ahead(user_id), lifetime)
