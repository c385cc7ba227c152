"""The record of one RPC, filled by the servicer and read by the entry interceptor for metrics and the audit line."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import grpc

from broker.model import TokenResult


@dataclass(slots=True)
class CallRecord:
    """What the servicer learned about one call."""

    caller: str | None = None
    user_id: str | None = None
    result: TokenResult | None = None
    reported: bool = False  # the request reported a rejected access token


current_call: ContextVar[CallRecord | None] = ContextVar("current_call", default=None)


def record_result(user_id: str, result: TokenResult, *, reported: bool = False) -> None:
    record = current_call.get()
    if record is not None:
        record.user_id = user_id
        record.result = result
        record.reported = reported


class Rejected(Exception):
    """An RPC refused with a gRPC status. Raised by the servicer and the gatekeeper; the entry point records the
    call (metrics, audit line) first and only then sends the status, so a scrape right after sees it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
