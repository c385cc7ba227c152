"""A circuit breaker for the identity provider: fail fast during an outage, probe to recover."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from broker.errors import IdpUnavailable


class CircuitState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures for `open_seconds`, and at once for as long as an IdP's
    Retry-After asks (the longer of the two); then lets one probe through.

    A successful probe closes it; a failed probe opens it again; a probe that ends any other way (`abandon`) gives
    the probe back. Only outages count as failures: an OAuth rejection is a healthy IdP answering."""

    def __init__(
        self,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self._threshold = failure_threshold
        self._open_seconds = open_seconds
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._state = CircuitState.CLOSED
        self._open_until = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() >= self._open_until:
            return CircuitState.HALF_OPEN
        return self._state

    def accepting(self) -> bool:
        """Whether a call could go out now (closed, or half-open with the probe free)."""
        state = self.state
        return state is CircuitState.CLOSED or (state is CircuitState.HALF_OPEN and not self._probe_in_flight)

    def before_call(self) -> None:
        """Raise IdpUnavailable when calls must not go out now; otherwise admit the call (maybe as the probe)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            self._set(CircuitState.HALF_OPEN)
            return
        raise IdpUnavailable("identity provider circuit is open")

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        self._set(CircuitState.CLOSED)

    def record_failure(self, *, retry_after: float | None = None) -> None:
        self._failures += 1
        tripped = self._probe_in_flight or self._failures >= self._threshold
        if not tripped and not retry_after:
            return
        self._probe_in_flight = False
        seconds = max(self._open_seconds if tripped else 0.0, retry_after or 0.0)
        self._open_until = max(self._open_until, self._clock() + seconds)
        self._set(CircuitState.OPEN)

    def abandon(self) -> None:
        """A call ended with neither an answer nor an outage (it was cancelled): give the probe back."""
        self._probe_in_flight = False

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
