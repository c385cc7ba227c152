"""The memory of refresh tokens the IdP rejected, so that a dead token is not sent again on every request."""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.model import Secret


class RejectedTokens:
    """Refresh tokens rejected with invalid_grant (or invalid_client ...), each remembered for `backoff` seconds.

    Bounded: past `limit` entries, the ones whose back-off has passed are dropped first."""

    def __init__(self, backoff: float, *, clock: Callable[[], float] = time.monotonic, limit: int = 10_000) -> None:
        self._backoff = backoff
        self._clock = clock
        self._limit = limit
        self._until: dict[Secret, float] = {}

    def remember(self, refresh_token: Secret) -> None:
        now = self._clock()
        if len(self._until) >= self._limit:
            self._until = {k: v for k, v in self._until.items() if v > now}
            while len(self._until) >= self._limit:  # all still live: forget the one that ends first
                del self._until[min(self._until, key=self._until.__getitem__)]
        self._until[refresh_token] = now + self._backoff

    def __contains__(self, refresh_token: object) -> bool:
        if not isinstance(refresh_token, Secret):
            return False
        until = self._until.get(refresh_token)
        if until is None:
            return False
        if self._clock() >= until:
            del self._until[refresh_token]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)
