"""Clients for Python callers: `TokenBrokerClient` (asyncio) and `SyncTokenBrokerClient` (threads, sync workers).

Defaults a caller would otherwise get wrong: a deadline on every call, retries of UNAVAILABLE with backoff in the
gRPC service config, keepalive, and one channel reused for every call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc

from broker.model import TokenStatus
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 2.0

#: Retries of UNAVAILABLE: the broker never started such a call (starting, draining, unreachable).
METHOD_CONFIG: list[dict[str, Any]] = [
    {
        "name": [{"service": "broker.v1.TokenBroker"}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }
]


#: A stream that ends with these is resumed with its cursor.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def service_config(target: str) -> str:
    """The retries, and round_robin over every address of a dns:/// target (a headless Service)."""
    config: dict[str, Any] = {"methodConfig": METHOD_CONFIG}
    if target.startswith("dns:///"):
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return json.dumps(config)


def channel_options(target: str, extra: list[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    return [("grpc.service_config", service_config(target)), *CHANNEL_OPTIONS, *(extra or [])]


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_FROM_PROTO = {
    pb.TOKEN_STATUS_VALID: TokenStatus.VALID,
    pb.TOKEN_STATUS_REFRESHED: TokenStatus.REFRESHED,
    pb.TOKEN_STATUS_NO_LINK: TokenStatus.NO_LINK,
    pb.TOKEN_STATUS_EXPIRED: TokenStatus.EXPIRED,
    pb.TOKEN_STATUS_REAUTH_REQUIRED: TokenStatus.REAUTH_REQUIRED,
    pb.TOKEN_STATUS_IDP_UNAVAILABLE: TokenStatus.IDP_UNAVAILABLE,
    pb.TOKEN_STATUS_STORE_UNAVAILABLE: TokenStatus.STORE_UNAVAILABLE,
    pb.TOKEN_STATUS_ACCOUNT_DISABLED: TokenStatus.ACCOUNT_DISABLED,
    pb.TOKEN_STATUS_EXCHANGE_DENIED: TokenStatus.EXCHANGE_DENIED,
}


@dataclass(frozen=True)
class OIDCToken:
    """A user's OIDC access token ("" when there is none) with its expiry and the broker's status."""

    access_token: str = field(repr=False)
    expires_at: datetime | None
    status: TokenStatus

    def bearer_headers(self) -> dict[str, str]:
        """`{"Authorization": "Bearer <token>"}` for a non-empty token, `{}` otherwise (the original rule)."""
        return {"Authorization": f"Bearer {self.access_token}"} if self.access_token else {}


def _token(resp: pb.GetOIDCAccessTokenResponse) -> OIDCToken:
    expires = resp.expires_at.ToDatetime(tzinfo=UTC) if resp.HasField("expires_at") else None
    status = _FROM_PROTO.get(resp.status)
    if status is None:
        raise ValueError(f"unknown token status {resp.status}")
    return OIDCToken(resp.access_token, expires, status)


def _request(user_id: str, rejected: str | None, resource: str | None = None) -> pb.GetOIDCAccessTokenRequest:
    """The request; `rejected` (an access token the upstream refused) travels only as its SHA-256. `resource`: the
    MCP server's URI, for a token issued for it (RFC 8707); None asks for the login token (passthrough)."""
    request = pb.GetOIDCAccessTokenRequest(user_id=user_id, resource=resource or "")
    if rejected:
        request.rejected_token_sha256 = hashlib.sha256(rejected.encode()).hexdigest()
    return request


_inject: Callable[[dict[str, str]], None] | None
try:  # the caller's trace context travels with the call when the worker uses OpenTelemetry
    from opentelemetry.propagate import inject as _inject
except ImportError:  # pragma: no cover - a worker without OpenTelemetry
    _inject = None


def _with_trace(metadata: tuple[tuple[str, str], ...] | None) -> tuple[tuple[str, str], ...] | None:
    """The call's metadata, plus traceparent (and tracestate) when a span is current in the caller."""
    if _inject is None:
        return metadata
    carrier: dict[str, str] = {}
    _inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


def _metadata(caller_token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {caller_token}"),) if caller_token else None


_C = TypeVar("_C", grpc.Channel, grpc.aio.Channel, covariant=True)


class _ChannelFactory(Protocol[_C]):
    """`grpc` or `grpc.aio`: the two modules build their channels with the same signatures."""

    def secure_channel(
        self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]
    ) -> _C: ...

    def insecure_channel(self, target: str, options: list[tuple[str, Any]]) -> _C: ...


def _channel(
    grpc_module: _ChannelFactory[_C],
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: list[tuple[str, Any]] | None,
) -> _C:
    """The one channel of a client, with the retries and keepalive of channel_options; TLS with `credentials`."""
    opts = channel_options(target, options)
    if credentials is not None:
        return grpc_module.secure_channel(target, credentials, options=opts)
    return grpc_module.insecure_channel(target, options=opts)


class TokenBrokerClient:
    """`async with TokenBrokerClient("broker:50051") as c: headers = await c.bearer_headers(user_id)`."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        caller_token: str | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._channel = _channel(grpc.aio, target, credentials, options)
        self._stub = pb_grpc.TokenBrokerStub(self._channel)
        self._timeout = timeout
        self._metadata = _metadata(caller_token)

    async def __aenter__(self) -> TokenBrokerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running on it fail with CANCELLED."""
        await self._channel.close()

    async def get_oidc_access_token(
        self, user_id: str, *, rejected: str | None = None, timeout: float | None = None, resource: str | None = None
    ) -> OIDCToken:
        """The user's token. `resource`: the MCP server's URI; the answer is then a token the IdP issued for that
        server (never the login token), or "" with EXCHANGE_DENIED. `rejected`: the access token an upstream just
        refused (HTTP 401); the broker then renews it once for every caller that reports it, or answers "".

        Raises grpc.aio.AioRpcError for RPC failures (INVALID_ARGUMENT, PERMISSION_DENIED for a resource this
        caller may not have, UNAVAILABLE after retries, ...)."""
        resp = await self._stub.GetOIDCAccessToken(
            _request(user_id, rejected, resource),
            timeout=timeout or self._timeout,
            metadata=_with_trace(self._metadata),
        )
        return _token(resp)

    async def get_token(
        self, user_id: str, *, resource: str | None = None, rejected: str | None = None, timeout: float | None = None
    ) -> OIDCToken:
        """The same as get_oidc_access_token: `await broker.get_token(user_id, resource="https://mcp.example/mcp")`."""
        return await self.get_oidc_access_token(user_id, rejected=rejected, timeout=timeout, resource=resource)

    async def bearer_headers(
        self, user_id: str, *, rejected: str | None = None, resource: str | None = None
    ) -> dict[str, str]:
        """{"Authorization": "Bearer ..."}, or {} when there is no usable token."""
        return (await self.get_oidc_access_token(user_id, rejected=rejected, resource=resource)).bearer_headers()

    async def watch_link_events(
        self, after: str = "", *, max_backoff: float = 5.0
    ) -> AsyncGenerator[pb.LinkEvent, None]:
        """Every link event after the cursor `after` (the id of the last event you handled; "" for live events
        only), then live ones, for as long as you iterate. When the stream breaks (UNAVAILABLE: a broker shutting
        down, a network break) it reconnects by itself with the id of the last event it yielded, so nothing is
        skipped; an event may come twice around a reconnection (ids identify them). Persist `event.id` after
        handling an event to resume there after a restart. Raises grpc.aio.AioRpcError for OUT_OF_RANGE (the
        cursor is past the retention: start again with "" and reconcile), PERMISSION_DENIED, INVALID_ARGUMENT."""
        cursor = after
        delay = 0.1
        while True:
            call = self._stub.WatchLinkEvents(pb.WatchLinkEventsRequest(after=cursor), metadata=self._metadata)
            try:
                async for response in call:
                    cursor = response.event.id
                    delay = 0.1
                    yield response.event
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RESUMABLE:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff)


class SyncTokenBrokerClient:
    """`with SyncTokenBrokerClient("broker:50051") as c: headers = c.bearer_headers(user_id)`: the same client for
    synchronous workers (thread-safe; one channel for every thread)."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        caller_token: str | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self._channel = _channel(grpc, target, credentials, options)
        self._stub = pb_grpc.TokenBrokerStub(self._channel)
        self._timeout = timeout
        self._metadata = _metadata(caller_token)

    def __enter__(self) -> SyncTokenBrokerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running on it fail with CANCELLED."""
        self._channel.close()

    def get_oidc_access_token(
        self, user_id: str, *, rejected: str | None = None, timeout: float | None = None, resource: str | None = None
    ) -> OIDCToken:
        """The user's token, as TokenBrokerClient.get_oidc_access_token answers it.

        Raises grpc.RpcError (a grpc.Call) for RPC failures (INVALID_ARGUMENT, UNAVAILABLE after retries, ...)."""
        resp = self._stub.GetOIDCAccessToken(
            _request(user_id, rejected, resource),
            timeout=timeout or self._timeout,
            metadata=_with_trace(self._metadata),
        )
        return _token(resp)

    def get_token(
        self, user_id: str, *, resource: str | None = None, rejected: str | None = None, timeout: float | None = None
    ) -> OIDCToken:
        """The user's token, as get_oidc_access_token; `resource`: a token issued for that MCP server."""
        return self.get_oidc_access_token(user_id, rejected=rejected, timeout=timeout, resource=resource)

    def bearer_headers(
        self, user_id: str, *, rejected: str | None = None, resource: str | None = None
    ) -> dict[str, str]:
        """{"Authorization": "Bearer ..."}, or {} when there is no usable token."""
        return self.get_oidc_access_token(user_id, rejected=rejected, resource=resource).bearer_headers()
