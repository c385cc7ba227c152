"""OpenTelemetry (#14): the span tree of a refresh, trace context to the IdP and from the caller, trace ids in logs.
The SDK's in-memory exporter stands in for an OTLP collector."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.client import TokenBrokerClient
from broker.config import Settings
from broker.telemetry.logs import JsonFormatter
from broker.telemetry.tracing import OtelTracer
from tests.support.broker import broker_env, running_broker
from tests.support.pg import Database
from tests.support.token_endpoint import TokenEndpoint


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def test_a_refresh_is_one_trace_from_the_caller_to_the_idp(
    db: Database, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    endpoint = TokenEndpoint()
    access, refresh = endpoint.issue()
    uid = uuid.uuid4()
    await db.insert_link(uid, access, refresh, datetime.now(UTC) - timedelta(minutes=5))
    env = broker_env(db, BROKER_OIDC_TOKEN_URL=endpoint.token_url, BROKER_OIDC_CLIENT_ID="b")
    env["BROKER_OIDC_CLIENT_SECRET"] = "s"
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter(trace_ids=True))
    audit = logging.getLogger("broker.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        async with running_broker(env, tracer=OtelTracer(provider)) as b, TokenBrokerClient(b.target) as client:
            with provider.get_tracer("chat-worker").start_as_current_span("tool call") as caller_span:
                token = await client.get_oidc_access_token(str(uid))
    finally:
        audit.removeHandler(handler)
        endpoint.close()
    assert token.access_token
    finished = {s.name: s for s in exporter.get_finished_spans()}
    server = finished["/broker.v1.TokenBroker/GetOIDCAccessToken"]
    trace_id = caller_span.get_span_context().trace_id
    assert server.context.trace_id == trace_id  # the client carried the caller's context
    assert server.attributes is not None
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["token_broker.status"] == "refreshed"
    assert server.attributes["token_broker.refreshed"] is True
    for child in ("db.read_link", "refresh.lock_wait", "idp.refresh", "db.write_back"):
        assert finished[child].context.trace_id == trace_id, child
    idp_span = finished["idp.refresh"]
    traceparent = endpoint.headers[0]["traceparent"]
    assert traceparent.split("-")[1] == format(trace_id, "032x")  # the IdP received the trace context
    attributes = json.dumps([dict(s.attributes or {}) for s in finished.values()])
    assert str(uid) not in attributes
    assert token.access_token not in attributes
    assert idp_span.parent is not None
    (line,) = [json.loads(x) for x in lines.getvalue().splitlines()]
    assert line["trace_id"] == format(trace_id, "032x")


async def test_the_user_id_is_on_the_span_only_when_asked(
    db: Database, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    uid = uuid.uuid4()
    await db.insert_link(uid, "t", "r", datetime.now(UTC) + timedelta(hours=1))
    async with running_broker(broker_env(db, BROKER_TRACE_USER_ID="true"), tracer=OtelTracer(provider)) as b:
        await b.get(uid)
    (server,) = [s for s in exporter.get_finished_spans() if s.name.endswith("GetOIDCAccessToken")]
    assert server.attributes is not None
    assert server.attributes["token_broker.user_id"] == str(uid)


def test_tracing_follows_the_standard_variables() -> None:
    base = {"BROKER_DATABASE_URL": "postgresql://x@h/d"}
    assert Settings.from_env(base).tracing is False
    assert Settings.from_env({**base, "OTEL_TRACES_EXPORTER": "otlp"}).tracing is True
    assert Settings.from_env({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}).tracing is True
    assert Settings.from_env({**base, "OTEL_TRACES_EXPORTER": "none"}).tracing is False
    assert Settings.from_env({**base, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}).tracing is False
