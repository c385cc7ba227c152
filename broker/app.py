"""The composition root: builds the pool, IdP client, refresher, service, interceptors, health and metrics inside an
AsyncExitStack, and owns start-up and shutdown. Nothing else in the package opens a resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, cast

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from broker import __version__
from broker.config import Settings, pool_shares, webhook_key
from broker.core import BackgroundSettings, CircuitSettings, Domain, RefreshSettings, ScheduleStore, build_domain
from broker.core.interfaces import ExchangeStore, Gatekeeper, IdentityProvider, LinkStore, TokenExchanger
from broker.errors import StoreUnavailable
from broker.events.webhook import WebhookDelivery
from broker.idp import OidcRefresher
from broker.postgres import (
    Cipher,
    ElevatedRoleGate,
    PostgresExchangeStore,
    PostgresSchedule,
    PostgresStore,
    parse_keys,
)
from broker.postgres.events import PostgresEvents
from broker.protected_resource import check_protected_resources
from broker.server import (
    SERVICE_NAME,
    CallerGate,
    CallerTokens,
    MeshIdentity,
    PolicySource,
    ReloadingCertificates,
    ReloadingPolicy,
    RpcEntry,
    TokenBrokerServicer,
    listen,
    load_caller_tokens,
)
from broker.server.watch import LinkEventWatch
from broker.telemetry import NULL_TRACER, OtelTracer, Tracer, sdk_provider
from broker.telemetry.metrics import Metrics
from broker.telemetry.procmetrics import RuntimeSnapshot
from broker.workers import WorkerReadiness, supervisor_pid

log = logging.getLogger("broker.app")


@dataclass(frozen=True)
class Service:
    """The servicer and the domain behind it, wired with no I/O."""

    servicer: TokenBrokerServicer
    domain: Domain


def refresh_settings(s: Settings) -> RefreshSettings:
    """The refresh core's settings, derived from the broker's (the domain never imports the configuration)."""
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


def background_settings(s: Settings, rs: RefreshSettings) -> BackgroundSettings | None:
    """The background refresh of active users' tokens (None: off, BROKER_PRODUCT_REFRESH_WINDOW=0)."""
    if s.product_refresh_window <= 0:
        return None
    return BackgroundSettings(
        product_window=s.product_refresh_window,
        active_window=s.active_window,
        jitter=s.background_jitter,
        claim_seconds=rs.hold_timeout + rs.store_timeout,
        refresh_seconds=rs.idp_timeout,
    )


def build_service(
    settings: Settings,
    store: LinkStore,
    idp: IdentityProvider | None,
    metrics: Metrics,
    tracer: Tracer = NULL_TRACER,
    schedule: ScheduleStore | None = None,
    *,
    exchange_store: ExchangeStore | None = None,
    policy: PolicySource | None = None,
    watch: LinkEventWatch | None = None,
) -> Service:
    """Wire the domain and the servicer around a store and an IdP (None: no IdP configured). No I/O. With a
    `schedule` (and an IdP), active users' tokens are refreshed in the background. With an exchange store, requests
    naming a resource get a token exchanged for it (when `policy` allows the caller)."""
    rs = refresh_settings(settings)
    bs = background_settings(settings, rs) if schedule is not None and idp is not None else None
    circuit = CircuitSettings(settings.circuit_failures, settings.circuit_open_seconds)
    exchanger = cast(TokenExchanger, idp) if callable(getattr(idp, "exchange", None)) else None
    domain = build_domain(
        rs,
        circuit,
        store,
        idp,
        metrics,
        tracer,
        background=bs,
        schedule=schedule,
        on_foreign_rotation=metrics.foreign_rotations.inc,
        exchange_store=exchange_store,
        exchanger=exchanger,
        exchange_observer=metrics,
    )
    metrics.bind_unpersisted(domain.unpersisted)
    servicer = TokenBrokerServicer(
        domain.tokens,
        settings.request_timeout,
        watch,
        exchange=domain.exchange,
        policy=policy,
        passthrough=settings.passthrough == "allow",
        on_denied=metrics.resource_denied,
    )
    return Service(servicer, domain)


class App:
    """One running broker. `start()` opens the pool and the IdP client (unless given), builds the service and the
    server, and starts the listeners; `stop()` drains and closes everything in reverse order.

    `store` and `idp` replace the PostgreSQL store and the OIDC client, as in Cosmic Python's bootstrap()."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        store: LinkStore | None = None,
        idp: IdentityProvider | None = None,
        tracer: Tracer | None = None,
        exchange_store: ExchangeStore | None = None,
    ) -> None:
        self.exchange_store = exchange_store
        if store is None:
            settings.require_database()
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, multiprocess=settings.workers_dir is not None)
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self.certificates: ReloadingCertificates | None = None
        self.store = store
        self.idp = idp
        self._stack = AsyncExitStack()
        if tracer is None and settings.tracing:
            tracer = OtelTracer(sdk_provider())
            # Closed last (pushed first): the spans still buffered are exported before the process exits.
            self._stack.callback(tracer.provider.shutdown)
        self.tracer = tracer or NULL_TRACER
        self._server: grpc.aio.Server | None = None
        self._entry: RpcEntry | None = None
        self._health = health.aio.HealthServicer()
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        await self._health.set("", listen.SERVING)
        await self._health.set(SERVICE_NAME, listen.NOT_SERVING)
        gatekeeper = _gatekeeper(self.settings, self.metrics.untrusted_identity_headers.inc)
        policy = None
        if self.settings.resources_file is not None:
            policy = ReloadingPolicy(self.settings.resources_file, self.settings.allowed_callers)
            log.info("resource policy loaded", extra={"resources": len(policy.current())})
        # The pool opens before the port is bound: a bound socket takes connections (with workers, SO_REUSEPORT
        # hands this one a share of the pod's), so a worker that cannot reach the database must not bind.
        store = await self._open_store()
        schedule = PostgresSchedule(store) if isinstance(store, PostgresStore) else None
        exchange_store = self.exchange_store
        if exchange_store is None and isinstance(store, PostgresStore):
            exchange_store = PostgresExchangeStore(store)
        feed = self._start_events(store)
        watch = LinkEventWatch(feed, self.settings.events.poll_interval, self._stopping)
        service = build_service(
            self.settings,
            store,
            await self._open_idp(),
            self.metrics,
            self.tracer,
            schedule,
            exchange_store=exchange_store,
            policy=policy,
            watch=watch,
        )
        self._stack.push_async_callback(service.domain.drain, self.settings.persist_retry_seconds + 1)
        if service.domain.background is not None:
            background = asyncio.create_task(service.domain.background.run(), name="background-refresh")
            self._stack.push_async_callback(_cancel, background)
        if policy is not None and self.settings.oidc_issuer:
            # RFC 9728: advisory, in the background; a slow MCP server must not hold the start-up.
            metadata = asyncio.create_task(
                check_protected_resources(
                    [e.resource for e in policy.current().entries()],
                    self.settings.oidc_issuer,
                    timeout=self.settings.oidc_timeout,
                ),
                name="protected-resource-metadata",
            )
            self._stack.push_async_callback(_cancel, metadata)
        self._server = self._build_server(service, gatekeeper)
        readiness = listen.Readiness(
            store, self._health, self.settings.health_interval, self._peers(), self._gate(store)
        )
        await readiness.check()  # before the port is bound: a worker's first probe answers for the pod
        await self._start_listeners(self._server)
        watching = asyncio.create_task(readiness.watch(self._stopping), name="readiness")
        self._stack.push_async_callback(_cancel, watching)
        if self.settings.workers_dir is not None:
            supervisor = supervisor_pid(self.settings.workers_dir)
            duties = asyncio.create_task(self._worker_duties(supervisor), name="worker-duties")
            self._stack.push_async_callback(_cancel, duties)
        log.info(
            "token-broker serving",
            extra={
                "listen": self.settings.listen,
                "port": self.port,
                "version": __version__,
                "metrics": self.settings.metrics_listen or None,
                "worker": self.settings.worker_index,
            },
        )

    def _gate(self, store: LinkStore) -> ElevatedRoleGate | None:
        """Readiness waits for the elevated role to be safe (a role pre-created with LOGIN or members is refused)."""
        return ElevatedRoleGate(store, self.settings.db_service_role) if isinstance(store, PostgresStore) else None

    def _start_events(self, store: LinkStore) -> PostgresEvents | None:
        """The outbox's reader, and the tasks that deliver webhooks and keep the outbox (retention, backlog)."""
        if not isinstance(store, PostgresStore):
            return None
        e = self.settings.events
        events = PostgresEvents(store, self.settings.request_timeout)
        if e.webhook_enabled:
            assert e.webhook_url is not None
            assert e.webhook_secret is not None
            key = webhook_key(e.webhook_secret)
            assert key is not None
            delivery = WebhookDelivery(
                events,
                e.webhook_url,
                key,
                timeout=e.webhook_timeout,
                retry_period=e.webhook_retry_period,
                poll_interval=e.poll_interval,
                on_result=lambda result: self.metrics.webhook_deliveries.labels(result=result).inc(),
            )
            self.metrics.on_link_event(delivery.wake)
            self._background(delivery.run(), "webhook-delivery")
        self._background(self._keep_outbox(events), "link-events-outbox")
        return events

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._stack.push_async_callback(_cancel, task)

    async def _keep_outbox(self, events: PostgresEvents) -> None:
        """Every few seconds the webhook backlog's age (a gauge); every minute, the retention."""
        pruned_at = 0.0
        while True:
            try:
                self.metrics.webhook_backlog_age.set(await events.backlog_seconds())
                if time.monotonic() - pruned_at >= 60:
                    pruned_at = time.monotonic()
                    gone = await events.prune(self.settings.events.retention)
                    if gone:
                        log.info("link events past the retention deleted", extra={"count": gone})
            except StoreUnavailable as exc:
                log.debug("link events outbox not kept this time: %s", exc)
            await asyncio.sleep(5.0)

    def _peers(self) -> WorkerReadiness | None:
        s = self.settings
        if s.workers_dir is None or s.worker_index is None:
            return None
        return WorkerReadiness(s.workers_dir, s.worker_index, s.workers, stale_after=3 * s.health_interval + 2)

    async def _worker_duties(self, supervisor: int) -> None:
        """Every second: the computed gauges for the shared metrics; and if the supervisor is gone (killed), this
        worker stops as on SIGTERM rather than serve on as an orphan. Also its runtime metrics for the supervisor."""
        s = self.settings
        assert s.workers_dir is not None
        assert s.worker_index is not None
        runtime = RuntimeSnapshot(s.workers_dir, s.worker_index)
        while True:
            if os.getppid() != supervisor:
                log.error("the supervisor is gone; stopping", extra={"worker": self.settings.worker_index})
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self.metrics.sample()
            with contextlib.suppress(OSError):  # a full disk must not end the check above
                runtime.write()
            await asyncio.sleep(1.0)

    async def _open_store(self) -> LinkStore:
        if self.store is not None:
            return self.store
        s = self.settings
        assert s.database_url is not None
        pool = await PostgresStore.create_pool(
            s.database_url.reveal(),
            min_size=min(s.db_pool_min, s.db_pool_max),
            max_size=s.db_pool_max,
            connect_timeout=s.request_timeout,
            statement_cache=s.db_statement_cache,
        )
        self._stack.push_async_callback(pool.close)
        cipher = None
        if s.encryption_keys is not None:
            cipher = Cipher(parse_keys(s.encryption_keys.reveal()))
        # A few connections are held for valid-token reads; refreshes get theirs, and one is always left over.
        store = PostgresStore(
            pool, cipher, read_connections=pool_shares(s.db_pool_max)[0], webhooks=s.events.webhook_enabled
        )
        self._stack.push_async_callback(store.close)  # before the pool closes: it waits for held connections
        self.metrics.bind_pool(store.pool_stats)
        if cipher is not None:
            # Before anything is served: the keys must be the product's (the broker never inserts keys).
            cipher.check(await store.dbcrypt_keys(timeout=s.request_timeout))
            log.info("encryption at rest on", extra={"primary_key": cipher.primary_digest})
        self.store = store
        return store

    async def _open_idp(self) -> IdentityProvider | None:
        if self.idp is not None:
            return self.idp
        s = self.settings
        if not s.idp_configured:
            log.warning("no identity provider configured: valid tokens are served, expired ones are not renewed")
            return None
        assert s.oidc_client_id is not None
        assert s.oidc_client_secret is not None
        client = OidcRefresher(
            tracer=self.tracer,
            client_id=s.oidc_client_id,
            client_secret=s.oidc_client_secret,
            timeout=s.oidc_timeout,
            issuer=s.oidc_issuer,
            token_url=s.oidc_token_url,
            auth_method=s.oidc_auth_method,
        )
        self._stack.push_async_callback(client.aclose)
        self.idp = client
        return client

    def _build_server(self, service: Service, gatekeeper: Gatekeeper) -> grpc.aio.Server:
        self._entry = RpcEntry(
            self.metrics,
            SERVICE_NAME,
            gatekeeper,
            self.tracer,
            self.settings.trace_user_id,
            worker=self.settings.worker_index,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if isinstance(self.tracer, OtelTracer):
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            server_spans = aio_server_interceptor(tracer_provider=self.tracer.provider)  # type: ignore[no-untyped-call]  # untyped package
            interceptors.append(server_spans)
        return listen.build_server(self.settings, interceptors, self._entry, service.servicer, self._health)

    async def _start_listeners(self, server: grpc.aio.Server) -> None:
        s = self.settings
        self.port, self.certificates = listen.bind(server, s)
        await server.start()
        if s.health_listen:
            self.health_port = await listen.start_health_port(s.health_listen, self._health, self._stack)
        if s.metrics_listen:
            self.metrics_port = listen.start_metrics(s.metrics_listen, self.registry, self._stack)

    async def stop(self, *, stop_server: bool = True) -> None:
        """Health NOT_SERVING; the optional drain delay (still serving, while load balancers notice); then every new
        call is answered UNAVAILABLE (safe to retry) while the calls in flight finish within the grace; everything
        closes in reverse order; then the server stops.

        `stop_server=False` (the `serve` process) leaves the transport to the process exit: gRPC's own server stop
        cancels the calls it has received but not yet dispatched (CANCELLED, which no client retries), whereas a
        closed connection is UNAVAILABLE to them, which every client may retry."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self._health.enter_graceful_shutdown()
        deadline = time.monotonic() + self.settings.drain_delay + self.settings.shutdown_grace
        if self._server is not None:
            if self.settings.drain_delay:
                await asyncio.sleep(self.settings.drain_delay)
            if self._entry is not None:
                self._entry.start_draining()
                await self._entry.quiesce(deadline)
        await self._stack.aclose()
        if self._server is not None and stop_server:
            await self._server.stop(max(deadline - time.monotonic(), 0.0))

    async def quiesce(self) -> None:
        """After stop(stop_server=False): return at a moment when no call is inside a handler (at most 1 s)."""
        if self._entry is not None:
            await self._entry.quiesce(time.monotonic() + 1.0, settle=0.0)
        log.info("token-broker stopped")


def _gatekeeper(s: Settings, on_untrusted: Callable[[], None]) -> Gatekeeper:
    tokens = None
    if s.caller_tokens_file is not None:
        load_caller_tokens(s.caller_tokens_file)  # fail fast on a malformed file
        tokens = CallerTokens(s.caller_tokens_file)
    mesh = None
    if s.trusted_proxy_identity != "none":
        mesh = MeshIdentity(s.trusted_proxy_identity, s.trusted_proxy_addresses, on_untrusted)
    return CallerGate(
        require_identity=s.requires_identity,
        mesh=mesh,
        allowed=s.allowed_callers,
        tokens=tokens,
        max_concurrent=s.max_concurrent_per_caller,
        watchers=s.events.watchers,
    )


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(settings: Settings, *, exit_process: Callable[[int], NoReturn] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully.

    With `exit_process`, the process ends from inside the loop at a moment when no call is inside a handler: the
    open connections close with it (UNAVAILABLE to calls still on their way), instead of gRPC's server stop or the
    loop's teardown cancelling them (CANCELLED)."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except BaseException:
        await app.stop()
        raise
    await stop.wait()
    log.info("shutdown requested")
    await app.stop(stop_server=exit_process is None)
    if exit_process is not None:
        await app.quiesce()
        exit_process(0)
