"""Audience-bound tokens: the user's login token exchanged at the IdP (RFC 8693) for a token issued for one resource
(RFC 8707), cached per (user, resource, audience, scope) and shared by every caller, worker and replica.

The rules, each in one place below:
- the login token is read (and refreshed) exactly as for a plain request; without one, its status is the answer;
- a cached exchanged token is served only while it is fresh (the refresh leeway, capped at half its lifetime) and
  only for the login token it was exchanged from (its SHA-256 is kept with it): a new login or a refresh makes it
  stale at once. Account state and the link itself are read on every request, before the cache;
- one exchange per key at a time: callers in this process share one task; replicas serialise on a lock in the
  database and re-read the row under it, so 300 callers on two replicas cost one IdP request;
- a refusal is remembered (for BROKER_REAUTH_BACKOFF) like a token, so a stampede on a denied resource costs one;
- a subject token the IdP calls invalid: the login token is refreshed once and the exchange retried once;
- outages count in the IdP's circuit and answer IDP_UNAVAILABLE (or the cached token while it has not expired);
  the login token is never the fallback;
- an upstream that rejects the exchanged token: it is dropped and exchanged again, at most once per key per
  BROKER_FORCED_REFRESH_INTERVAL across replicas (the loop guard), else EXCHANGE_DENIED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from broker.core.circuit import CircuitBreaker
from broker.core.interfaces import ExchangeObserver, ExchangeStore, NullObserver, TokenExchanger
from broker.core.policy import effective_leeway
from broker.core.refresh.settings import RefreshSettings
from broker.core.resources import ResourceEntry
from broker.core.tokens import TokenService
from broker.errors import (
    BrokerError,
    ExchangeDenied,
    IdpUnavailable,
    RefreshLockTimeout,
    StoreUnavailable,
    SubjectTokenRejected,
)
from broker.model import CachedExchange, ExchangedToken, Secret, TokenResult, TokenStatus, utcnow
from broker.telemetry.logs import UserLog
from broker.telemetry.tracing import NULL_TRACER, Tracer

log = logging.getLogger("broker.exchange")

EXCHANGED = "exchanged"
CACHED = "cached"


class GuardedExchanger:
    """The IdP's token exchange behind the same circuit breaker as the refresh grant, with metrics and a span.

    Only outages count against the circuit; a refusal is a healthy IdP saying no."""

    def __init__(
        self, inner: TokenExchanger, circuit: CircuitBreaker, observer: ExchangeObserver, tracer: Tracer = NULL_TRACER
    ) -> None:
        self._inner = inner
        self._circuit = circuit
        self._obs = observer
        self._tracer = tracer

    def refusal(self) -> BrokerError | None:
        return None if self._circuit.accepting() else IdpUnavailable("identity provider circuit is open")

    async def exchange(self, subject: Secret, entry: ResourceEntry) -> ExchangedToken:
        self._circuit.before_call()
        started = time.monotonic()
        result = "error"
        try:
            with self._tracer.span("idp.exchange", **{"token_broker.resource": entry.resource}):
                token = await self._inner.exchange(subject, entry.resource, entry.audience, entry.scope)
            result = "success"
            self._circuit.record_success()
            return token
        except ExchangeDenied:
            result = "denied"
            self._circuit.record_success()
            raise
        except SubjectTokenRejected:
            result = "subject_rejected"
            self._circuit.record_success()
            raise
        except IdpUnavailable as exc:
            result = "idp_unavailable"
            self._circuit.record_failure(retry_after=exc.retry_after)
            raise
        except asyncio.CancelledError:
            result = "cancelled"
            self._circuit.abandon()
            raise
        except BaseException:
            self._circuit.record_failure()
            raise
        finally:
            if result != "cancelled":
                self._obs.exchange_finished(result, time.monotonic() - started)


@dataclass(frozen=True, slots=True)
class _Exchanged:
    """The outcome of an exchange with its one retry: a token or a refusal, for the login token actually used; or
    the login token's own status when the refresh of a refused subject token failed."""

    subject_sha256: bytes
    token: ExchangedToken | None = None
    denied: ExchangeDenied | None = None
    login: TokenResult | None = None


class ExchangeService:
    """Answers "a token for user U issued for resource R" (R already allowed by the policy for the caller)."""

    def __init__(
        self,
        tokens: TokenService,
        store: ExchangeStore,
        exchanger: GuardedExchanger | None,
        settings: RefreshSettings,
        *,
        observer: ExchangeObserver | None = None,
        tracer: Tracer = NULL_TRACER,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._tokens = tokens
        self._store = store
        self._exchanger = exchanger
        self._settings = settings
        self._obs: ExchangeObserver = observer or NullObserver()
        self._tracer = tracer
        self._clock = clock
        self._flights: dict[tuple[UUID, tuple[str, str, str], bytes, bytes | None], asyncio.Task[TokenResult]] = {}
        # Each exchange holds a pooled connection (the key's lock) across the IdP call: bounded like refreshes.
        self._slots = asyncio.Semaphore(max(1, settings.max_concurrent))

    async def get_token(
        self, user_id: UUID, entry: ResourceEntry, budget: float, rejected: bytes | None = None
    ) -> TokenResult:
        """Within `budget` seconds. `rejected`: SHA-256 of an exchanged token the resource's server refused."""
        deadline = time.monotonic() + budget
        try:
            with self._tracer.span("db.read_link"):
                link, cached = await self._store.get_link_and_exchanged(user_id, entry.key, timeout=budget)
        except StoreUnavailable as exc:
            UserLog(log, user_id).warning("store unavailable: %s", exc)
            return TokenResult.empty(TokenStatus.STORE_UNAVAILABLE)  # never the login token, not even a pending one
        login = await self._tokens.answer(user_id, link, deadline)  # refreshed here when due, as for any request
        if not login.access_token:
            return login  # no link, account disabled, expired, must log in again, an outage: the user's own status
        subject_sha = login.access_token.sha256()
        cached = self._for_subject(user_id, cached, subject_sha)  # a refreshed login token: not this row's
        answer = self._from_cache(cached, rejected)
        if answer is not None:
            self._obs.exchange_cache_hit()
            return answer
        if self._exchanger is None:
            UserLog(log, user_id).error("a resource is configured but no identity provider: no token exchange")
            return TokenResult.empty(TokenStatus.EXCHANGE_DENIED)
        if self._exchanger.refusal() is not None:
            return self._fallback(cached, rejected, TokenStatus.IDP_UNAVAILABLE)
        key = (user_id, entry.key, subject_sha, rejected)
        task = self._flights.get(key)
        if task is None:
            task = asyncio.create_task(
                self._run(user_id, entry, login.access_token, cached, rejected),
                name=f"exchange:{user_id}:{entry.fingerprint()}",
            )
            self._flights[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=_left(deadline))
        except TimeoutError:
            UserLog(log, user_id).info("token exchange still running when the caller's budget ran out")
            return self._fallback(cached, rejected, TokenStatus.IDP_UNAVAILABLE)

    def _landed(
        self, key: tuple[UUID, tuple[str, str, str], bytes, bytes | None], task: asyncio.Task[TokenResult]
    ) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]

    def _for_subject(self, user_id: UUID, cached: CachedExchange | None, subject_sha: bytes) -> CachedExchange | None:
        """The row only when it belongs to the current login token and can be read."""
        if cached is None or cached.subject_sha256 != subject_sha:
            return None
        if cached.unreadable is not None:
            UserLog(log, user_id).error(
                "cached exchanged token cannot be read: %s; exchanging again", cached.unreadable
            )
            return None
        return cached

    def _fresh(self, cached: CachedExchange) -> bool:
        if not cached.access_token or cached.expiry is None:
            return False
        lifetime = timedelta(seconds=cached.lifetime_seconds) if cached.lifetime_seconds else None
        return self._clock() < cached.expiry - effective_leeway(self._settings.leeway, lifetime)

    def _from_cache(self, cached: CachedExchange | None, rejected: bytes | None) -> TokenResult | None:
        """The answer the cache gives without the IdP: a fresh token (not the one reported), or a live denial."""
        if cached is None:
            return None
        if cached.access_token:
            if rejected is not None and cached.access_token.sha256() == rejected:
                return None
            if self._fresh(cached):
                return TokenResult(TokenStatus.VALID, cached.access_token, cached.expiry, exchange=CACHED)
            return None
        if cached.denied_seconds is not None and cached.denied_seconds > 0:
            return TokenResult(TokenStatus.EXCHANGE_DENIED, exchange=CACHED)
        return None

    def _fallback(self, cached: CachedExchange | None, rejected: bytes | None, status: TokenStatus) -> TokenResult:
        """After a failed exchange: the cached token of this login while it has not actually expired (and was not
        reported), else "" with `status`. Never the login token."""
        if (
            cached is not None
            and cached.access_token
            and cached.expiry is not None
            and self._clock() < cached.expiry
            and (rejected is None or cached.access_token.sha256() != rejected)
        ):
            return TokenResult(TokenStatus.VALID, cached.access_token, cached.expiry, failure=status, exchange=CACHED)
        return TokenResult.empty(status)

    async def _run(
        self, user_id: UUID, entry: ResourceEntry, subject: Secret, seen: CachedExchange | None, rejected: bytes | None
    ) -> TokenResult:
        ulog = UserLog(log, user_id)
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout=self._settings.lock_timeout)
            except TimeoutError:
                raise RefreshLockTimeout("too many token exchanges queued in this process") from None
            try:
                return await self._locked(user_id, entry, subject, rejected)
            finally:
                self._slots.release()
        except (IdpUnavailable, RefreshLockTimeout) as exc:
            ulog.warning("token exchange not done: %s", exc)
            return self._fallback(seen, rejected, TokenStatus.IDP_UNAVAILABLE)
        except StoreUnavailable as exc:
            ulog.warning("token exchange not done: %s", exc)
            return TokenResult.empty(TokenStatus.STORE_UNAVAILABLE)
        except Exception:
            ulog.exception("token exchange failed unexpectedly")
            return TokenResult.empty(TokenStatus.IDP_UNAVAILABLE)

    async def _locked(
        self, user_id: UUID, entry: ResourceEntry, subject: Secret, rejected: bytes | None
    ) -> TokenResult:
        """Under the key's lock (every replica's): re-read, answer from the row when another caller or replica has
        just exchanged (or been refused), else exchange and write the row."""
        s = self._settings
        ulog = UserLog(log, user_id)
        outcome: _Exchanged | None = None
        try:
            async with self._store.lock_exchanged(
                user_id, entry.key, lock_timeout=s.lock_timeout, hold_timeout=s.hold_timeout
            ) as locked:
                cached = self._for_subject(user_id, locked.cached, subject.sha256())
                forced = False
                if rejected is not None and cached is not None and cached.access_token.sha256() == rejected:
                    if cached.forced_seconds_ago is not None and cached.forced_seconds_ago < s.forced_interval:
                        ulog.warning(
                            "the upstream rejected a token exchanged %.0fs ago after its last rejection; not exchanging"
                            " again (resource %s)",
                            cached.forced_seconds_ago,
                            entry.resource,
                        )
                        return TokenResult.empty(TokenStatus.EXCHANGE_DENIED)
                    forced = True
                if not forced:
                    answer = self._from_cache(cached, rejected)
                    if answer is not None:
                        return answer
                outcome = await self._exchange(user_id, entry, subject)
                if outcome.denied is not None:
                    await locked.deny(outcome.subject_sha256, s.reauth_backoff, outcome.denied.error)
                elif outcome.token is not None and outcome.token.expiry is not None:
                    await locked.save(outcome.subject_sha256, outcome.token, forced=forced)
                elif outcome.token is not None:
                    ulog.info("exchanged token has no known lifetime: answered, not cached")
        except StoreUnavailable as exc:
            if outcome is None or outcome.login is not None:
                raise
            ulog.warning("exchange outcome not cached (%s); answered anyway", exc)
        assert outcome is not None
        if outcome.login is not None:
            return outcome.login
        if outcome.denied is not None:
            ulog.warning(
                "identity provider refused the token exchange for %s (%s); remembered for %ss",
                entry.resource,
                outcome.denied.error,
                s.reauth_backoff,
            )
            return TokenResult.empty(TokenStatus.EXCHANGE_DENIED)
        assert outcome.token is not None
        return TokenResult(
            TokenStatus.REFRESHED, outcome.token.access_token, outcome.token.expiry, refreshed=True, exchange=EXCHANGED
        )

    async def _exchange(self, user_id: UUID, entry: ResourceEntry, subject: Secret) -> _Exchanged:
        """The exchange; when the IdP calls the subject token invalid, the login token is refreshed once (forced,
        with its own loop guard) and the exchange retried once."""
        assert self._exchanger is not None
        try:
            return _Exchanged(subject.sha256(), token=await self._exchanger.exchange(subject, entry))
        except ExchangeDenied as exc:
            return _Exchanged(subject.sha256(), denied=exc)
        except SubjectTokenRejected as exc:
            UserLog(log, user_id).info("identity provider refused the login token (%s); refreshing it once", exc.error)
        s = self._settings
        login = await self._tokens.get_token(user_id, s.lock_timeout + s.idp_timeout, rejected=subject.sha256())
        if not login.access_token:
            return _Exchanged(subject.sha256(), login=login)
        fresh = login.access_token
        try:
            return _Exchanged(fresh.sha256(), token=await self._exchanger.exchange(fresh, entry))
        except ExchangeDenied as exc:
            return _Exchanged(fresh.sha256(), denied=exc)
        except SubjectTokenRejected as exc:
            # A fresh login token refused as well: the IdP's policy, not the user's session.
            return _Exchanged(fresh.sha256(), denied=ExchangeDenied(f"{exc.error} for a fresh subject token"))


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)
