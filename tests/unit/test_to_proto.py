"""The response's expires_at: exact, as Timestamp.FromDatetime computes it, for any instant and offset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker.model import Secret, TokenResult, TokenStatus
from broker.server.service import to_proto


@pytest.mark.parametrize(
    "expiry",
    [
        datetime(2026, 11, 29, 7, 30, 1, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(2030, 1, 1, 12, 0),  # naive: UTC
    ],
)
def test_expires_at_matches_from_datetime(expiry: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(expiry)
    response = to_proto(TokenResult(TokenStatus.VALID, Secret("tok"), expiry))
    assert (response.expires_at.seconds, response.expires_at.nanos) == (expected.seconds, expected.nanos)
    assert response.access_token == "tok"


def test_no_token_no_expiry() -> None:
    response = to_proto(TokenResult.empty(TokenStatus.NO_LINK))
    assert not response.HasField("expires_at")
    assert response.access_token == ""
