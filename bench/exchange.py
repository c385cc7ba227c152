"""The cached exchanged-token path (#24) against the passthrough path, on one broker in the same run: the same user,
the same caller token, a request with `resource` (served from the exchanged-token cache: the link read, then the
cache row) against one without (the login token: the link read alone). Pairs alternated; the median ratio."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from bench.load import PRODUCTION, frame, h2load, median
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import BrokerProcess, broker_env
from tests.support.idp import OidcTestProvider
from tests.support.pg import DatabaseFactory

RESOURCE = "https://mcp.bench.example/mcp"
CALLER = "bench-caller-token-5f1c"


async def cached_exchange(
    factory: DatabaseFactory, tmp: Path, prod_env: dict[str, str], pairs: int = 3
) -> dict[str, Any]:
    db = await factory.create("plain")
    idp = OidcTestProvider()
    broker = None
    try:
        idp.allow_exchange(RESOURCE, ttl=3600)
        user = uuid.uuid4()
        issued = await idp.login(f"bench-{user}")
        await db.insert_link(user, issued.access_token, issued.refresh_token, datetime.now(UTC) + timedelta(days=30))
        callers = tmp / "bench-callers.txt"
        callers.write_text(f"bench:{hashlib.sha256(CALLER.encode()).hexdigest()}\n")
        policy = tmp / "bench-resources.json"
        policy.write_text(json.dumps([{"resource": RESOURCE, "callers": ["token:bench"]}]))
        env = broker_env(
            db, idp, **{**prod_env, "BROKER_CALLER_TOKENS_FILE": str(callers), "BROKER_RESOURCES_FILE": str(policy)}
        )
        broker = BrokerProcess(env, tmp / "exchange.log", metrics=True)
        bodies, sizes = {}, {}
        with grpc.insecure_channel(broker.target) as channel:
            stub = pb_grpc.TokenBrokerStub(channel)
            for name, resource in (("passthrough", ""), ("cached_exchange", RESOURCE)):
                request = pb.GetOIDCAccessTokenRequest(user_id=str(user), resource=resource)
                stub.GetOIDCAccessToken(request, timeout=10, metadata=(("authorization", f"Bearer {CALLER}"),))
                answer = stub.GetOIDCAccessToken(request, timeout=10, metadata=(("authorization", f"Bearer {CALLER}"),))
                assert answer.status == pb.TOKEN_STATUS_VALID, (name, answer.status)
                body = tmp / f"{name}.bin"
                body.write_bytes(frame(request.SerializeToString()))
                bodies[name], sizes[name] = body, len(frame(answer.SerializeToString()))
        header = (f"authorization: Bearer {CALLER}",)
        rounds: list[dict[str, Any]] = []
        ratios: list[float] = []
        exchanges_before = idp.stats()["exchange_success"]
        for _ in range(pairs):
            runs = {name: h2load(broker.port, bodies[name], sizes[name], PRODUCTION, header) for name in bodies}
            ratios.append(round(runs["cached_exchange"]["rps"] / runs["passthrough"]["rps"], 3))
            rounds.append({**runs, "ratio": ratios[-1]})
        assert idp.stats()["exchange_success"] == exchanges_before  # every measured call was served from the cache
        return {"rounds": rounds, "ratio_cached_vs_passthrough": median(ratios)}
    finally:
        if broker is not None:
            broker.stop()
        idp.close()
