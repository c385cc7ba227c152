"""The gRPC servicer: proto <-> domain, input validation and the per-RPC deadline budget. No SQL, no HTTP."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Protocol
from uuid import UUID

import grpc

from broker.core.exchange import ExchangeService
from broker.core.resources import ResourcePolicy, normalise_resource
from broker.core.tokens import TokenService
from broker.model import TokenResult, TokenStatus, parse_sha256_hex
from broker.server.entry import Rejected, call_identities, record_resource, record_result
from broker.server.watch import LinkEventWatch
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc

log = logging.getLogger("broker.service")


class PolicySource(Protocol):
    """Where the resource policy in force comes from: a fixed ResourcePolicy, or the file re-read on change."""

    def current(self) -> ResourcePolicy: ...


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenBroker"].full_name
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MARGIN = 0.05  # seconds kept back from the caller's deadline to send the answer
#: One message for a resource that is not configured and for a caller not listed for it: no probing.
NOT_ALLOWED = "caller is not allowed a token for this resource"
PASSTHROUGH_DENIED = "a resource is required: this broker does not hand out login tokens (BROKER_PASSTHROUGH=deny)"

STATUS_TO_PROTO = {
    TokenStatus.VALID: pb.TOKEN_STATUS_VALID,
    TokenStatus.REFRESHED: pb.TOKEN_STATUS_REFRESHED,
    TokenStatus.NO_LINK: pb.TOKEN_STATUS_NO_LINK,
    TokenStatus.EXPIRED: pb.TOKEN_STATUS_EXPIRED,
    TokenStatus.REAUTH_REQUIRED: pb.TOKEN_STATUS_REAUTH_REQUIRED,
    TokenStatus.IDP_UNAVAILABLE: pb.TOKEN_STATUS_IDP_UNAVAILABLE,
    TokenStatus.STORE_UNAVAILABLE: pb.TOKEN_STATUS_STORE_UNAVAILABLE,
    TokenStatus.ACCOUNT_DISABLED: pb.TOKEN_STATUS_ACCOUNT_DISABLED,
    TokenStatus.EXCHANGE_DENIED: pb.TOKEN_STATUS_EXCHANGE_DENIED,
}


def parse_user_id(text: str) -> UUID | None:
    """The canonical 36-character UUID text form only; length is checked before any parsing."""
    if len(text) != 36 or not _UUID.fullmatch(text):
        return None
    return UUID(text)


def to_proto(result: TokenResult) -> pb.GetOIDCAccessTokenResponse:
    response = pb.GetOIDCAccessTokenResponse(status=STATUS_TO_PROTO[result.status])
    if result.access_token:
        response.access_token = result.access_token.reveal()
        expiry = result.expiry
        if expiry is not None:
            # Exact integer arithmetic instead of Timestamp.FromDatetime's generic path (per call, on the hot path).
            since = (expiry if expiry.tzinfo is not None else expiry.replace(tzinfo=UTC)) - _EPOCH
            response.expires_at.seconds = since.days * 86400 + since.seconds
            response.expires_at.nanos = since.microseconds * 1000
    return response


class TokenBrokerServicer(pb_grpc.TokenBrokerServicer):
    """broker.v1.TokenBroker: validates the request, derives the budget from the caller's deadline (capped by
    BROKER_REQUEST_TIMEOUT), asks the token service, and maps its result to the response."""

    def __init__(
        self,
        tokens: TokenService,
        request_timeout: float,
        watch: LinkEventWatch | None = None,
        *,
        exchange: ExchangeService | None = None,
        policy: PolicySource | None = None,
        passthrough: bool = True,
        on_denied: Callable[[str], None] | None = None,
    ) -> None:
        self._tokens = tokens
        self._request_timeout = request_timeout
        self._watch = watch
        self._exchange = exchange
        self._policy = policy or ResourcePolicy()
        self._passthrough = passthrough
        self._on_denied = on_denied or (lambda reason: None)

    def WatchLinkEvents(  # noqa: N802 - the name is the RPC's
        self, request: pb.WatchLinkEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchLinkEventsResponse]:
        if self._watch is None:
            raise Rejected(grpc.StatusCode.UNIMPLEMENTED, "link events are not served here")
        return self._watch.watch(request, context)

    async def GetOIDCAccessToken(  # noqa: N802 - the name is the RPC's
        self, request: pb.GetOIDCAccessTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetOIDCAccessTokenResponse:
        user_id = parse_user_id(request.user_id)
        if user_id is None:
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                "user_id must be a UUID in canonical text form (8-4-4-4-12 hex digits)",
            )
        remaining = context.time_remaining()
        rejected = None
        if request.rejected_token_sha256:
            try:
                rejected = parse_sha256_hex(request.rejected_token_sha256)
            except ValueError:
                raise Rejected(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "rejected_token_sha256 must be the SHA-256 of the rejected access token in hex (64 characters)",
                ) from None
        budget = self._request_timeout if remaining is None else min(remaining - _MARGIN, self._request_timeout)
        if budget <= 0:
            raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline too short to look up a token")
        if request.resource:
            result = await self._for_resource(user_id, request.user_id, request.resource, budget, rejected)
        elif not self._passthrough:
            self._on_denied("passthrough")
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, PASSTHROUGH_DENIED)
        else:
            result = await self._tokens.get_token(user_id, budget, rejected)
        record_result(request.user_id, result, reported=rejected is not None)
        return to_proto(result)

    async def _for_resource(
        self, user_id: UUID, user_text: str, resource: str, budget: float, rejected: bytes | None
    ) -> TokenResult:
        try:
            normalised = normalise_resource(resource)
        except ValueError as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"resource {exc}") from None
        record_resource(user_text, normalised)
        entry = self._policy.current().match(normalised, call_identities())
        if entry is None or self._exchange is None:
            self._on_denied("not_allowed")
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, NOT_ALLOWED)
        return await self._exchange.get_token(user_id, entry, budget, rejected)
