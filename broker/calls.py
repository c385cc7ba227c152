"""The record of one RPC, filled by the servicer and read by the entry interceptor for metrics and the audit line."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from broker.model import TokenResult


@dataclass(slots=True)
class CallRecord:
    """What the servicer learned about one call."""

    caller: str | None = None
    user_id: str | None = None
    result: TokenResult | None = None


current_call: ContextVar[CallRecord | None] = ContextVar("current_call", default=None)


def record_result(user_id: str, result: TokenResult) -> None:
    record = current_call.get()
    if record is not None:
        record.user_id = user_id
        record.result = result
