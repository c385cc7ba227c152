"""Prometheus metrics, created on a registry injected at start-up (never import-time globals).

No label carries a user id, a token or any other unbounded value: labels are statuses, results, gRPC codes and
method names, all from closed sets.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from broker import __version__
from broker.errors import ConfigError
from broker.model import EVENT_TYPES, TokenStatus

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REMAINING_BUCKETS = (0, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 86400)
REFRESH_RESULTS = ("success", "invalid_grant", "rejected", "idp_unavailable", "outcome_unknown", "error")

#: refreshed: a new token; replaced: the stored token was already another one (no IdP call); loop_guard: a
#: rejection of the token a forced refresh just produced; not_renewable: no refresh token or no IdP; failed: the
#: refresh failed ("" with the usual status).
WEBHOOK_RESULTS = ("delivered", "retry", "failed", "gone")

FORCED_RESULTS = ("refreshed", "replaced", "loop_guard", "not_renewable", "failed")
#: Token exchanges sent to the IdP (RFC 8693), by result: success; denied (invalid_target, access_denied ...);
#: subject_rejected (the login token refused: refreshed once and retried); idp_unavailable; error.
EXCHANGE_RESULTS = ("success", "denied", "subject_rejected", "idp_unavailable", "error")
#: Requests refused by the resource policy: not_allowed (unknown resource or caller not listed: one answer),
#: passthrough (no resource while BROKER_PASSTHROUGH=deny).
RESOURCE_DENIALS = ("not_allowed", "passthrough")

del GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR  # the default registry's copies are not used


class Metrics:
    """Every metric of the broker; also the refresher's RefreshObserver."""

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool = False) -> None:
        """`multiprocess`: one of several workers (PROMETHEUS_MULTIPROC_DIR set): values go to the shared files
        the supervisor's /metrics reads, gauges are summed over live workers, and the gauges computed on scrape
        here are sampled by `sample()` instead."""
        self.registry = registry
        self._multiprocess = multiprocess
        self._sampled: list[tuple[Gauge, Callable[[], float]]] = []
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.build_info = Gauge(
            "token_broker_build_info", "Build information.", ["version"], registry=registry, multiprocess_mode="max"
        )
        self.build_info.labels(version=__version__).set(1)
        self.token_requests = Counter(
            "token_broker_token_requests", "Token requests answered, by TokenStatus.", ["status"], registry=registry
        )
        for status in TokenStatus:
            self.token_requests.labels(status=status.value)
        self.refreshes = Counter(
            "token_broker_refreshes", "Refresh grants sent to the IdP, by result.", ["result"], registry=registry
        )
        for result in REFRESH_RESULTS:
            self.refreshes.labels(result=result)
        self.refresh_duration = Histogram(
            "token_broker_refresh_duration_seconds",
            "IdP round trip of a refresh grant.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.lock_wait = Histogram(
            "token_broker_refresh_lock_wait_seconds",
            "Wait for the per-link refresh lock in PostgreSQL.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.refresh_inflight = Gauge(
            "token_broker_refresh_inflight",
            "Refreshes running (summed over the workers).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.foreign_rotations = Counter(
            "token_broker_foreign_rotations",
            "Refresh tokens found in the database that no broker wrote (the product refreshed, or a new login).",
            registry=registry,
        )
        self.untrusted_identity_headers = Counter(
            "token_broker_untrusted_identity_headers",
            "Calls that carried a sidecar identity header from a peer that is not the local sidecar (ignored).",
            registry=registry,
        )
        self.forced_refreshes = Counter(
            "token_broker_forced_refreshes",
            "Token requests for a stored access token an upstream rejected (reported, or remembered), by outcome.",
            ["result"],
            registry=registry,
        )
        for result in FORCED_RESULTS:
            self.forced_refreshes.labels(result=result)
        self.exchanges = Counter(
            "token_broker_exchanges",
            "Token exchanges sent to the IdP (RFC 8693), by result.",
            ["result"],
            registry=registry,
        )
        for result in EXCHANGE_RESULTS:
            self.exchanges.labels(result=result)
        self.exchange_duration = Histogram(
            "token_broker_exchange_duration_seconds",
            "IdP round trip of a token exchange.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.exchange_cache_hits = Counter(
            "token_broker_exchange_cache_hits",
            "Requests for a resource answered from the exchanged-token cache (a token or a remembered refusal).",
            registry=registry,
        )
        self.resource_denials = Counter(
            "token_broker_resource_denials",
            "Requests refused PERMISSION_DENIED by the resource policy, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in RESOURCE_DENIALS:
            self.resource_denials.labels(reason=reason)
        self.persist_failures = Counter(
            "token_broker_refresh_persist_failures",
            "Refreshed tokens whose write-back still failed after retrying (kept in memory).",
            registry=registry,
        )
        self.token_remaining = Histogram(
            "token_broker_token_remaining_seconds",
            "Lifetime left on tokens served (tokens with an expiry).",
            buckets=_REMAINING_BUCKETS,
            registry=registry,
        )
        self.circuit = Gauge(
            "token_broker_idp_circuit_state",
            "IdP circuit breaker: 0 closed, 1 open, 2 half-open (the most open of the workers').",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.db_pool_size = Gauge(
            "token_broker_db_pool_connections",
            "Connections in the pool.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.db_pool_in_use = Gauge(
            "token_broker_db_pool_connections_in_use",
            "Pool connections in use (up to two per worker are held for valid-token reads).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.unpersisted = Gauge(
            "token_broker_refresh_unpersisted",
            "Refreshed tokens held in memory awaiting write-back.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # Link events (issue 25).
        self.link_events = Counter(
            "token_broker_link_events",
            "Link events written (one per state change of a link), by type.",
            ["type"],
            registry=registry,
        )
        for event_type in EVENT_TYPES:
            self.link_events.labels(type=event_type)
        self.webhook_deliveries = Counter(
            "token_broker_webhook_deliveries",
            "Webhook delivery attempts, by result: delivered (2xx), retry (failed, retried later), failed (the retry "
            "period is over), gone (410: the endpoint is stopped).",
            ["result"],
            registry=registry,
        )
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result=result)
        self.webhook_backlog_age = Gauge(
            "token_broker_webhook_oldest_undelivered_seconds",
            "Age of the oldest link event still waiting for its webhook delivery (0: none; the largest a worker saw).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.event_watchers = Gauge(
            "token_broker_event_watchers",
            "WatchLinkEvents streams open.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._event_listeners: list[Callable[[str], None]] = []
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=registry)
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def bind_pool(self, stats: Callable[[], tuple[int, int]]) -> None:
        self._bind(self.db_pool_size, lambda: stats()[0])
        self._bind(self.db_pool_in_use, lambda: stats()[1])

    def bind_unpersisted(self, count: Callable[[], int]) -> None:
        self._bind(self.unpersisted, lambda: float(count()))

    def _bind(self, gauge: Gauge, read: Callable[[], float]) -> None:
        if self._multiprocess:
            self._sampled.append((gauge, read))
        else:
            gauge.set_function(read)

    def sample(self) -> None:
        """Multiprocess mode: set the computed gauges now (called every second by the worker)."""
        for gauge, read in self._sampled:
            gauge.set(read())

    # RefreshObserver
    def refresh_finished(self, result: str, seconds: float) -> None:
        self.refreshes.labels(result=result).inc()
        self.refresh_duration.observe(seconds)

    def lock_waited(self, seconds: float) -> None:
        self.lock_wait.observe(seconds)

    def inflight(self, delta: int) -> None:
        self.refresh_inflight.inc(delta)

    def persist_failed(self) -> None:
        self.persist_failures.inc()

    def circuit_state(self, state: int) -> None:
        self.circuit.set(state)

    def forced_refresh(self, result: str) -> None:
        self.forced_refreshes.labels(result=result).inc()

    # ExchangeObserver
    def exchange_finished(self, result: str, seconds: float) -> None:
        self.exchanges.labels(result=result).inc()
        self.exchange_duration.observe(seconds)

    def exchange_cache_hit(self) -> None:
        self.exchange_cache_hits.inc()

    def resource_denied(self, reason: str) -> None:
        self.resource_denials.labels(reason=reason).inc()

    def link_event(self, event_type: str) -> None:
        self.link_events.labels(type=event_type).inc()
        for listener in self._event_listeners:
            listener(event_type)

    def on_link_event(self, listener: Callable[[str], None]) -> None:
        """Also tell `listener` of every link event this process writes (the webhook delivery wakes up)."""
        self._event_listeners.append(listener)


def serve_metrics(listen: str, registry: CollectorRegistry) -> tuple[int, Callable[[], None]]:
    """Prometheus /metrics over HTTP on its own thread: the bound port, and the function that stops it."""
    host, _, port = listen.rpartition(":")
    try:
        httpd, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise ConfigError(f"BROKER_METRICS_LISTEN: cannot bind {listen}: {exc}") from None

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return int(httpd.server_port), stop
