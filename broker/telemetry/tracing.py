"""OpenTelemetry tracing, off by default and free when off.

On when the standard variables ask for an exporter (OTEL_TRACES_EXPORTER=otlp, or an OTLP endpoint), and not
OTEL_SDK_DISABLED; the SDK then reads the other OTEL_* variables itself (endpoint, headers, sampler). What is traced:
a server span per RPC (gRPC instrumentation, `rpc.*` conventions) with children for the database read, the wait for
the refresh lock, the IdP call (which carries `traceparent`) and the write-back. Attributes never hold a token; the
user id only with BROKER_TRACE_USER_ID=true.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any


class Tracer:
    """Spans around the broker's steps. This base class is the "off" tracer: every method is a no-op."""

    enabled = False

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        yield

    def annotate(self, **attributes: Any) -> None:
        """Set attributes on the current span (the RPC's, inside a handler)."""

    def inject(self, carrier: dict[str, str]) -> None:
        """Add the current trace context (traceparent) to outgoing headers."""


NULL_TRACER = Tracer()


class OtelTracer(Tracer):
    """Tracer on an OpenTelemetry TracerProvider (the SDK's, or a test's with an in-memory exporter)."""

    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self._tracer = provider.get_tracer("token-broker")
        self._trace = trace
        self._propagate = propagate

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        with self._tracer.start_as_current_span(name, attributes=attributes or None):
            yield

    def annotate(self, **attributes: Any) -> None:
        span = self._trace.get_current_span()
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)

    def inject(self, carrier: dict[str, str]) -> None:
        self._propagate.inject(carrier)


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def sdk_provider() -> Any:
    """The SDK's TracerProvider with the OTLP (HTTP) exporter; the SDK reads OTEL_* for the rest."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "token-broker"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def log_ids() -> dict[str, str]:
    """trace_id and span_id of the current span, for a log line written inside one (empty outside)."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
