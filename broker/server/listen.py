"""The server's listening edges: the gRPC server with its services, the ports it binds (TLS or not), the plaintext
health port, the metrics HTTP endpoint, and readiness following the database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from broker.config import Settings
from broker.core.interfaces import LinkStore
from broker.errors import ConfigError
from broker.server.entry import RpcEntry
from broker.server.service import SERVICE_NAME, TokenBrokerServicer
from broker.server.tls import ReloadingCertificates
from broker.telemetry.metrics import serve_metrics
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.workers.readiness import WorkerReadiness

log = logging.getLogger("broker.app")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_server(
    s: Settings,
    interceptors: list[grpc.aio.ServerInterceptor],
    entry: RpcEntry,
    servicer: TokenBrokerServicer,
    health_servicer: health.aio.HealthServicer,
) -> grpc.aio.Server:
    """The gRPC server: the token service, health and reflection, each method wrapped by the entry; `interceptors`
    (tracing, when on) run before it."""
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", s.max_request_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    registering = entry.registering(server)
    pb_grpc.add_TokenBrokerServicer_to_server(servicer, registering)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registering)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["TokenBroker"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,  # streaming only (nothing to wrap); it picks its aio servicer by the server's type
    )
    return server


def bind(server: grpc.aio.Server, s: Settings) -> tuple[int, ReloadingCertificates | None]:
    """Bind BROKER_LISTEN (with TLS when configured); the port, and the reloading certificates if any."""
    certificates = None
    try:
        if s.tls_enabled:
            assert s.tls_cert_file is not None
            assert s.tls_key_file is not None
            certificates = ReloadingCertificates(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
            port = int(server.add_secure_port(s.listen, certificates.server_credentials()))
        else:
            port = int(server.add_insecure_port(s.listen))
    except RuntimeError as exc:
        raise ConfigError(f"BROKER_LISTEN: cannot bind {s.listen}: {exc}") from None
    if port == 0:
        raise ConfigError(f"BROKER_LISTEN: cannot bind {s.listen}")
    return port, certificates


async def start_health_port(listen: str, health_servicer: health.aio.HealthServicer, stack: AsyncExitStack) -> int:
    """A plaintext port with only the health service, for kubelet probes when the main port needs TLS."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = int(server.add_insecure_port(listen))
    except RuntimeError as exc:
        raise ConfigError(f"BROKER_HEALTH_LISTEN: cannot bind {listen}: {exc}") from None
    await server.start()
    stack.push_async_callback(server.stop, 0)
    return port


def start_metrics(listen: str, registry: CollectorRegistry, stack: AsyncExitStack) -> int:
    """Prometheus /metrics over HTTP on its own thread; stopped with the stack."""
    port, stop = serve_metrics(listen, registry)
    stack.callback(stop)
    return port


class Readiness:
    """The token service's readiness: SERVING only while the database answers and `gate` (the elevated role's check)
    passes (with workers: while at least one worker's does, this one included, since a probe speaks for the pod)."""

    def __init__(
        self,
        store: LinkStore,
        health_servicer: health.aio.HealthServicer,
        interval: float,
        peers: WorkerReadiness | None = None,
        gate: Callable[[float], Awaitable[bool]] | None = None,
    ) -> None:
        self._gate = gate
        self._store = store
        self._health = health_servicer
        self._interval = interval
        self._peers = peers
        self._seen: tuple[bool, bool] | None = None

    async def check(self) -> None:
        """Once: the first time before the port is bound, so that no probe meets a worker that has not decided."""
        own = await self._store.ping(timeout=min(self._interval, 2.0))
        if own and self._gate is not None:  # the elevated role's check: a role others can reach is not served
            own = await self._gate(min(self._interval, 2.0))
        ok = own
        if self._peers is not None:
            self._peers.report(own)
            ok = own or self._peers.any_ready()
        if (ok, own) != self._seen:
            if self._seen is None or ok != self._seen[0]:
                await self._health.set(SERVICE_NAME, SERVING if ok else NOT_SERVING)
            self._seen = (ok, own)
            (log.info if own else log.error)("readiness changed", extra={"serving": ok, "database": own})

    async def watch(self, stopping: asyncio.Event) -> None:
        """Check every `interval` until `stopping`."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._interval)
            if not stopping.is_set():
                await self.check()
