"""The composition root: builds the pool, IdP client, refresher, service, interceptors, health and metrics inside an
AsyncExitStack, and owns start-up and shutdown. Nothing else in the package opens a resource."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from contextlib import AsyncExitStack
from datetime import timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from broker import __version__
from broker.auth import CallerGate, CallerTokens, load_caller_tokens
from broker.circuit import CircuitBreaker
from broker.config import Settings
from broker.errors import ConfigError
from broker.idp import OidcRefresher
from broker.interceptors import Gatekeeper, ServerInterceptor
from broker.metrics import Metrics
from broker.refresher import Refresher, RefreshSettings
from broker.service import SERVICE_NAME, TokenBrokerServicer
from broker.store import PostgresStore
from broker.tls import ReloadingCertificates
from broker.tokens import TokenService
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc

log = logging.getLogger("broker.app")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class App:
    """One running broker. `start()` binds and serves; `stop()` drains and closes everything in reverse order."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        if settings.database_url is None:
            raise ConfigError("invalid configuration:\n  BROKER_DATABASE_URL or BROKER_DATABASE_URL_FILE: required")
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self.certificates: ReloadingCertificates | None = None
        self._stack = AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._store: PostgresStore | None = None
        self._refresher: Refresher | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        stack = self._stack
        await self._health.set("", SERVING)
        await self._health.set(SERVICE_NAME, NOT_SERVING)

        gatekeeper = await self._gatekeeper(stack)

        assert s.database_url is not None
        pool = await PostgresStore.create_pool(
            s.database_url.reveal(),
            min_size=min(s.db_pool_min, s.db_pool_max),
            max_size=s.db_pool_max,
            connect_timeout=s.request_timeout,
        )
        stack.push_async_callback(pool.close)
        self._store = store = PostgresStore(pool)
        self.metrics.bind_pool(store.pool_stats)

        idp: OidcRefresher | None = None
        if s.idp_configured:
            assert s.oidc_client_id is not None
            assert s.oidc_client_secret is not None
            idp = OidcRefresher(
                client_id=s.oidc_client_id,
                client_secret=s.oidc_client_secret,
                timeout=s.oidc_timeout,
                issuer=s.oidc_issuer,
                token_url=s.oidc_token_url,
                auth_method=s.oidc_auth_method,
            )
            stack.push_async_callback(idp.aclose)
        else:
            log.warning("no identity provider configured: valid tokens are served, expired ones are not renewed")

        circuit = CircuitBreaker(
            s.circuit_failures, s.circuit_open_seconds, on_change=lambda st: self.metrics.circuit_state(int(st))
        )
        self._refresher = refresher = Refresher(
            store,
            idp,
            RefreshSettings(
                leeway=timedelta(seconds=s.refresh_leeway),
                lock_timeout=s.refresh_lock_timeout,
                reauth_backoff=s.reauth_backoff,
                persist_retry_seconds=s.persist_retry_seconds,
                store_timeout=s.request_timeout,
                max_concurrent=max(1, s.db_pool_max // 2),
                in_flight_window=s.oidc_timeout + s.persist_retry_seconds + 5,
            ),
            circuit,
            observer=self.metrics,
        )
        stack.push_async_callback(refresher.drain, s.persist_retry_seconds + 1)
        self.metrics.bind_unpersisted(lambda: refresher.unpersisted)
        tokens = TokenService(
            store,
            refresher,
            leeway=timedelta(seconds=s.refresh_leeway),
            refresh_ahead=timedelta(seconds=s.refresh_ahead),
            idp_configured=idp is not None,
        )

        server = grpc.aio.server(
            interceptors=[ServerInterceptor(self.metrics, SERVICE_NAME, gatekeeper)],
            options=[
                ("grpc.max_receive_message_length", s.max_request_bytes),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        pb_grpc.add_TokenBrokerServicer_to_server(TokenBrokerServicer(tokens, s.request_timeout), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["TokenBroker"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = self._bind(server, gatekeeper)
        await server.start()
        self._server = server
        if s.health_listen:
            await self._start_health_port()

        if s.metrics_listen:
            host, _, port = s.metrics_listen.rpartition(":")
            httpd, thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
            self.metrics_port = httpd.server_port

            def _stop_http() -> None:
                httpd.shutdown()
                httpd.server_close()
                thread.join(timeout=5)

            stack.callback(_stop_http)

        readiness = asyncio.create_task(self._watch_database(), name="readiness")
        stack.push_async_callback(_cancel, readiness)
        log.info(
            "token-broker serving",
            extra={"listen": s.listen, "port": self.port, "version": __version__, "metrics": s.metrics_listen or None},
        )

    async def _gatekeeper(self, stack: AsyncExitStack) -> Gatekeeper:
        s = self.settings
        tokens = None
        if s.caller_tokens_file is not None:
            load_caller_tokens(s.caller_tokens_file)  # fail fast on a malformed file
            tokens = CallerTokens(s.caller_tokens_file)
        return CallerGate(
            require_identity=s.authenticates_callers,
            allowed=s.allowed_callers,
            tokens=tokens,
            max_concurrent=s.max_concurrent_per_caller,
        )

    def _bind(self, server: grpc.aio.Server, gatekeeper: Gatekeeper) -> int:
        s = self.settings
        if not s.listen_is_loopback and not s.authenticates_callers and not s.allow_insecure:
            raise ConfigError(
                f"refusing to listen on non-loopback address {s.listen} without caller authentication: set "
                "BROKER_TLS_CLIENT_CA_FILE or BROKER_CALLER_TOKENS_FILE, or BROKER_ALLOW_INSECURE=true"
            )
        try:
            if s.tls_enabled:
                assert s.tls_cert_file is not None
                assert s.tls_key_file is not None
                self.certificates = ReloadingCertificates(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
                port = int(server.add_secure_port(s.listen, self.certificates.server_credentials()))
            else:
                port = int(server.add_insecure_port(s.listen))
        except RuntimeError as exc:
            raise ConfigError(f"BROKER_LISTEN: cannot bind {s.listen}: {exc}") from None
        if port == 0:
            raise ConfigError(f"BROKER_LISTEN: cannot bind {s.listen}")
        return port

    async def _start_health_port(self) -> None:
        """A plaintext port with only the health service, for kubelet probes when the main port needs TLS."""
        s = self.settings
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            self.health_port = int(server.add_insecure_port(s.health_listen))
        except RuntimeError as exc:
            raise ConfigError(f"BROKER_HEALTH_LISTEN: cannot bind {s.health_listen}: {exc}") from None
        await server.start()
        self._stack.push_async_callback(server.stop, 0)

    async def _watch_database(self) -> None:
        """Readiness: the token service is SERVING only while the database answers; checked periodically."""
        assert self._store is not None
        serving: bool | None = None
        while not self._stopping.is_set():
            ok = await self._store.ping(timeout=min(self.settings.health_interval, 2.0))
            if ok != serving and not self._stopping.is_set():
                serving = ok
                await self._health.set(SERVICE_NAME, SERVING if ok else NOT_SERVING)
                (log.info if ok else log.error)("readiness changed", extra={"serving": ok})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.health_interval)

    async def stop(self) -> None:
        """Health NOT_SERVING, optional drain delay, stop with grace, then close everything in reverse order."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            if self.settings.drain_delay:
                await asyncio.sleep(self.settings.drain_delay)
            await self._server.stop(self.settings.shutdown_grace)
        await self._stack.aclose()
        log.info("token-broker stopped")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
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
    await app.stop()
