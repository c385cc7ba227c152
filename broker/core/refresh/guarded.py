"""The IdP as the refresher sees it: behind the circuit breaker and the metrics, or absent."""

from __future__ import annotations

import asyncio
import time

from broker.core.circuit import CircuitBreaker
from broker.core.interfaces import IdentityProvider, RefreshObserver
from broker.errors import BrokerError, IdpNotConfigured, IdpOutcomeUnknown, IdpRejected, IdpUnavailable
from broker.model import RefreshedTokens, Secret


class GuardedIdentityProvider:
    """An IdentityProvider that calls another through the circuit breaker and reports every outcome.

    Only outages count against the circuit; a rejection is a healthy IdP saying no. A Retry-After keeps the circuit
    open at least that long. Whatever happens to a call (an unexpected exception, a cancellation), a half-open
    probe is given back, so the circuit can never stay stuck."""

    def __init__(self, inner: IdentityProvider, circuit: CircuitBreaker, observer: RefreshObserver) -> None:
        self._inner = inner
        self._circuit = circuit
        self._obs = observer

    def refusal(self) -> BrokerError | None:
        """While the circuit is open, the error a call would get: callers answer fast, without taking any lock."""
        return None if self._circuit.accepting() else IdpUnavailable("identity provider circuit is open")

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens:
        self._circuit.before_call()
        started = time.monotonic()
        try:
            tokens = await self._inner.refresh(refresh_token)
        except IdpRejected as exc:
            self._circuit.record_success()
            self._finished("invalid_grant" if exc.error == "invalid_grant" else "rejected", started)
            raise
        except IdpUnavailable as exc:
            self._circuit.record_failure(retry_after=exc.retry_after)
            self._finished("outcome_unknown" if isinstance(exc, IdpOutcomeUnknown) else "idp_unavailable", started)
            raise
        except asyncio.CancelledError:
            self._circuit.abandon()
            raise
        except BaseException:
            self._circuit.record_failure()
            self._finished("error", started)
            raise
        self._circuit.record_success()
        self._finished("success", started)
        return tokens

    def _finished(self, result: str, started: float) -> None:
        self._obs.refresh_finished(result, time.monotonic() - started)


class NullIdentityProvider:
    """No IdP configured: an expired token cannot be renewed."""

    def refusal(self) -> BrokerError | None:
        return IdpNotConfigured("no identity provider configured")

    async def refresh(self, refresh_token: Secret) -> RefreshedTokens:
        raise IdpNotConfigured("no identity provider configured")
