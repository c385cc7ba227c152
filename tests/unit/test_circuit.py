"""The IdP circuit breaker, on an injected clock."""

from __future__ import annotations

import pytest

from broker.core.circuit import CircuitBreaker, CircuitState
from broker.errors import IdpUnavailable


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_threshold_then_probes_and_closes() -> None:
    clock = Clock()
    changes: list[CircuitState] = []
    cb = CircuitBreaker(3, 10.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        cb.before_call()
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    cb.before_call()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN  # type: ignore[comparison-overlap]  # a property: it changed
    with pytest.raises(IdpUnavailable):
        cb.before_call()
    clock.t = 10.0
    assert cb.state is CircuitState.HALF_OPEN
    cb.before_call()  # the one probe
    with pytest.raises(IdpUnavailable):
        cb.before_call()  # no second probe while the first is out
    cb.record_success()
    assert cb.state is CircuitState.CLOSED
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]


def test_failed_probe_reopens() -> None:
    clock = Clock()
    cb = CircuitBreaker(1, 5.0, clock=clock)
    cb.before_call()
    cb.record_failure()
    clock.t = 5.0
    cb.before_call()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    clock.t = 9.0
    with pytest.raises(IdpUnavailable):
        cb.before_call()


def test_success_resets_the_failure_count() -> None:
    cb = CircuitBreaker(2, 5.0, clock=Clock())
    cb.record_failure()
    cb.record_success()
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED
