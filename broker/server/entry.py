"""Where every RPC enters: caller authorisation, per-caller limits, gRPC metrics, the access/audit log line, and the
last-resort mapping of unexpected exceptions to INTERNAL; and the record of one call, filled by the servicer and read
here. Each method's handler is wrapped once, when the services are registered (not a grpc.aio interceptor, which
grpc awaits on every call)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from broker.core.interfaces import Gatekeeper
from broker.model import TokenResult, TokenStatus
from broker.telemetry.logs import info_line
from broker.telemetry.metrics import Metrics
from broker.telemetry.tracing import NULL_TRACER, Tracer

log = logging.getLogger("broker.access")
audit_log = logging.getLogger("broker.audit")


@dataclass(slots=True)
class CallRecord:
    """What the servicer learned about one call."""

    caller: str | None = None
    user_id: str | None = None
    result: TokenResult | None = None
    reported: bool = False  # the request reported a rejected access token
    identities: tuple[str, ...] = ()  # every identity the caller authenticated with (the resource policy's input)
    resource: str | None = None  # the resource the request named (a URI, never a token)
    events: int = 0  # WatchLinkEvents: events sent


current_call: ContextVar[CallRecord | None] = ContextVar("current_call", default=None)


def record_result(user_id: str, result: TokenResult, *, reported: bool = False) -> None:
    record = current_call.get()
    if record is not None:
        record.user_id = user_id
        record.result = result
        record.reported = reported


def record_identities(identities: list[str]) -> None:
    """The caller's authenticated identities, for the resource policy (set by the gatekeeper)."""
    record = current_call.get()
    if record is not None:
        record.identities = tuple(identities)


def call_identities() -> tuple[str, ...]:
    record = current_call.get()
    return record.identities if record is not None else ()


def record_resource(user_id: str, resource: str) -> None:
    """The resource a request named, audited even when the request is refused."""
    record = current_call.get()
    if record is not None:
        record.user_id = user_id
        record.resource = resource


class Rejected(Exception):
    """An RPC refused with a gRPC status. Raised by the servicer and the gatekeeper; the entry point records the
    call (metrics, audit line) first and only then sends the status, so a scrape right after sees it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _noop() -> None:
    pass


@dataclass(frozen=True, slots=True)
class _Unparsable:
    """A request whose bytes are not a valid message (kept out of logs: only its size)."""

    size: int


def _lenient(deserialize: Any) -> Any:
    """The generated deserializer fails outside any handler (UNKNOWN and a traceback from grpc's core): hand the
    failure to the handler instead, where it becomes INVALID_ARGUMENT."""

    def lenient(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception:
            return _Unparsable(len(data))

    return lenient


class RpcEntry:
    """Where every RPC enters: admits the caller (protected service only), counts it, writes its access or audit
    line, and maps an unexpected exception to INTERNAL with a generic message. Each method's handler is wrapped
    once, at registration (`registering(server)`), with its metric children bound up front."""

    def __init__(
        self,
        metrics: Metrics,
        protected_service: str,
        gatekeeper: Gatekeeper,
        tracer: Tracer = NULL_TRACER,
        trace_user_id: bool = False,
        worker: int | None = None,
    ) -> None:
        self._worker = worker
        self._tracer = tracer
        self._trace_user_id = trace_user_id
        self._metrics = metrics
        self._by_status = {status: metrics.token_requests.labels(status=status.value) for status in TokenStatus}
        self._protected = protected_service
        self._gate = gatekeeper
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._draining = False
        self._in_flight = 0

    def registering(self, server: grpc.aio.Server) -> _Registering:
        """`server` as the generated add_*_to_server functions see it: every unary method they add is wrapped."""
        return _Registering(server, self)

    def handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any] | None
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The wrapped handler of `method` (unary and server-streaming; other streaming handlers as they are)."""
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrap = self._wrap if handler.unary_unary is not None else self._wrap_stream
            wrapped = self._wrapped[method] = wrap(method, handler)
        return wrapped

    def start_draining(self) -> None:
        """Shutdown has begun: every call that reaches a handler from now on is answered UNAVAILABLE at once, which
        a client may retry safely (nothing was started for it)."""
        self._draining = True

    async def quiesce(self, deadline: float, *, settle: float = 0.3) -> None:
        """While draining: give the calls that already reached the server `settle` seconds to reach a handler (and
        be answered), then return at a moment when no call is inside a handler, or at `deadline`."""
        settle_until = min(time.monotonic() + settle, deadline)
        while time.monotonic() < deadline:
            if time.monotonic() >= settle_until and not self._in_flight:
                return
            await asyncio.sleep(0.005)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, method = full_method.lstrip("/").rpartition("/")
        protected = service == self._protected
        labels = ("unary", service, method)
        inner = handler.unary_unary
        m = self._metrics
        gate = self._gate
        started_total = m.grpc_started.labels(*labels)
        handling_seconds = m.grpc_seconds.labels(*labels)
        handled: dict[grpc.StatusCode, Any] = {}
        lenient = _lenient(handler.request_deserializer)

        def finish(code: grpc.StatusCode, started: float, context: Any, record: CallRecord) -> None:
            elapsed = time.perf_counter() - started
            child = handled.get(code)
            if child is None:
                child = handled[code] = m.grpc_handled.labels(*labels, code.name)
            child.inc()
            handling_seconds.observe(elapsed)
            self._finish(full_method, protected, code, elapsed, context, record)

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            record = CallRecord()
            token = current_call.set(record)
            started_total.inc()
            self._in_flight += 1
            code = grpc.StatusCode.OK
            release = _noop
            finished = False
            try:
                if self._draining:
                    raise Rejected(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry")
                if protected:
                    record.caller, release = await gate.admit(context, context.invocation_metadata() or ())
                if isinstance(request, _Unparsable):
                    log.warning("request body is not a valid message (%d bytes) in %s", request.size, full_method)
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "request body is not a valid protobuf message")
                return await inner(request, context)
            except Rejected as rejected:
                code = rejected.code
                finished = True
                finish(code, started, context, record)  # recorded before the status reaches the caller
                await context.abort(rejected.code, rejected.message)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("unexpected error in %s", full_method)
                code = grpc.StatusCode.INTERNAL
                finished = True
                finish(code, started, context, record)
                try:
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                except grpc.aio.AbortError:
                    raise
                except Exception:  # the call already ended (caller gone, status sent): nothing left to send
                    raise grpc.aio.AbortError() from None
            finally:
                self._in_flight -= 1
                release()
                current_call.reset(token)
                if not finished:
                    finish(code, started, context, record)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=lenient,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A server-streaming method (WatchLinkEvents): admitted by the watchers' allowlist, not counted against
        the per-caller limit, under no request timeout; refused while draining; one audit line when it ends."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        protected = service == self._protected
        labels = ("server_stream", service, method)
        inner = handler.unary_stream
        m = self._metrics
        gate = self._gate
        lenient = _lenient(handler.request_deserializer)

        def finish(code: grpc.StatusCode, started: float, context: Any, record: CallRecord) -> None:
            elapsed = time.perf_counter() - started
            m.grpc_handled.labels(*labels, code.name).inc()
            m.grpc_seconds.labels(*labels).observe(elapsed)
            fields: dict[str, Any] = {
                "method": full_method,
                "grpc_code": code.name,
                "duration_ms": round(elapsed * 1000, 3),
                "peer": context.peer(),
                "caller": record.caller,
                "events": record.events,
                "audit": True,
            }
            if self._worker is not None:
                fields["worker"] = self._worker
            info_line(audit_log, "link events watch", fields)

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            record = CallRecord()
            token = current_call.set(record)
            m.grpc_started.labels(*labels).inc()
            self._in_flight += 1
            code = grpc.StatusCode.OK
            watching = False
            try:
                if self._draining:
                    raise Rejected(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry")
                if protected:
                    record.caller = await gate.admit_watcher(context, context.invocation_metadata() or ())
                if isinstance(request, _Unparsable):
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "request body is not a valid protobuf message")
                m.event_watchers.inc()
                watching = True
                async for response in inner(request, context):
                    yield response
            except Rejected as rejected:
                code = rejected.code
                await context.abort(rejected.code, rejected.message)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("unexpected error in %s", full_method)
                code = grpc.StatusCode.INTERNAL
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                if watching:
                    m.event_watchers.dec()
                self._in_flight -= 1
                with contextlib.suppress(ValueError):  # a generator closed from another context (at exit)
                    current_call.reset(token)
                finish(code, started, context, record)

        return grpc.unary_stream_rpc_method_handler(
            observed,
            request_deserializer=lenient,
            response_serializer=handler.response_serializer,
        )

    def _finish(
        self,
        method: str,
        protected: bool,
        code: grpc.StatusCode,
        elapsed: float,
        context: grpc.aio.ServicerContext[Any, Any],
        record: CallRecord,
    ) -> None:
        """Token-request metrics and the one access (or audit) line per RPC."""
        fields: dict[str, Any] = {
            "method": method,
            "grpc_code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "peer": context.peer(),
        }
        if not protected:
            log.debug("rpc", extra=fields)
            return
        result = record.result
        if result is not None:
            self._by_status[result.status].inc()
            if result.expiry is not None and result.access_token:
                remaining = result.expiry.timestamp() - time.time()
                self._metrics.token_remaining.observe(max(remaining, 0.0))
        fields.update(
            caller=record.caller,
            user_id=record.user_id,
            status=result.status.value if result else None,
            refreshed=result.refreshed if result else False,
            rejected_token_reported=record.reported,
            audit=True,
        )
        if record.resource is not None:
            fields["resource"] = record.resource
            fields["exchange"] = result.exchange if result else None
        if self._worker is not None:
            fields["worker"] = self._worker
        info_line(audit_log, "token request", fields)
        if self._tracer.enabled:
            self._tracer.annotate(
                **{
                    "token_broker.status": fields["status"],
                    "token_broker.refreshed": fields["refreshed"],
                    "token_broker.caller": record.caller,
                    "token_broker.resource": record.resource,
                    "token_broker.user_id": record.user_id if self._trace_user_id else None,
                }
            )


class _Registering:
    """A server whose method handlers are wrapped by the entry as they are added."""

    def __init__(self, server: grpc.aio.Server, entry: RpcEntry) -> None:
        self._server = server
        self._entry = entry

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {name: self._entry.handler(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Generic(h, self._entry) for h in handlers))


class _Generic(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped (Any)
    def __init__(self, inner: grpc.GenericRpcHandler, entry: RpcEntry) -> None:
        self._inner = inner
        self._entry = entry

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._entry.handler(details.method, self._inner.service(details))
