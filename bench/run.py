"""`make bench`: throughput and memory of the broker's hot path, as ratios against baselines measured in the same run.

1. gRPC: h2load drives GetOIDCAccessToken (a valid token: one database round trip) against the broker, and the same
   RPC against a bare grpc.aio server with a constant answer. Success is checked by response bytes, since h2load
   counts HTTP 200 with a non-zero grpc-status as success.
2. Elevation: SECURITY DEFINER function (one round trip) against SET LOCAL ROLE in a transaction (four).
3. Memory: the broker's RSS after the load, against the bare server's.
Results go to stdout and bench/results/latest.json.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.echo_server import ANSWER
from broker.devdb import free_port
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import ROOT, BrokerProcess, broker_env
from tests.support.pg import DatabaseFactory, PgServer
from tests.support.pgbouncer import PgBouncer

REQUESTS = 20000
CLIENTS = 4
STREAMS = 8  # per connection: 32 in flight


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load(port: int, body: Path, expected_response_bytes: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "h2load",
            "-n",
            str(REQUESTS),
            "-c",
            str(CLIENTS),
            "-m",
            str(STREAMS),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            str(body),
            f"http://127.0.0.1:{port}/broker.v1.TokenBroker/GetOIDCAccessToken",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    succeeded = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
    data = int(re.search(r"traffic: .*?\((\d+)\) data", out).group(1))  # type: ignore[union-attr]
    latency = re.search(r"time for request:\s+([\d.]+)(us|ms)\s+([\d.]+)(us|ms)\s+([\d.]+)(us|ms)", out)
    mean_ms = float(latency.group(5)) / (1000 if latency.group(6) == "us" else 1) if latency else float("nan")
    ok_by_bytes = data / expected_response_bytes
    return {"rps": rps, "succeeded": succeeded, "ok_by_bytes": round(ok_by_bytes), "mean_ms": mean_ms}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def elevation_round_trips(admin_url: str, service_url: str, user: uuid.UUID, n: int = 3000) -> dict[str, float]:
    """µs per valid-token read: the SECURITY DEFINER function vs SET LOCAL ROLE inside a transaction."""
    role = f"tb_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE token_broker_elevated")
    await admin.execute(f"GRANT USAGE ON SCHEMA token_broker TO {role}")
    try:
        fn = await asyncpg.connect(service_url)
        setrole = await asyncpg.connect(admin_url.replace("postgres@", f"{role}@", 1))
        read = (
            "SELECT oauth_access_token, oauth_refresh_token, oauth_expiry FROM user_links"
            " WHERE user_id = $1 AND login_type = 'oidc'"
        )

        async def via_function() -> None:
            await fn.fetchrow("SELECT * FROM token_broker.get_oidc_link($1)", user)

        async def via_set_role() -> None:
            async with setrole.transaction():
                await setrole.execute("SET LOCAL ROLE token_broker_elevated")
                await setrole.fetchrow(read, user)

        results = {}
        for name, op in (("security_definer_us", via_function), ("set_local_role_us", via_set_role)):
            for _ in range(200):
                await op()
            started = time.perf_counter()
            for _ in range(n):
                await op()
            results[name] = (time.perf_counter() - started) / n * 1e6
        await fn.close()
        await setrole.close()
        return results
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def encrypted_valid_token(factory: DatabaseFactory, tmp: Path, body: Path) -> dict[str, Any]:
    """The same valid-token load on the product's schema with both tokens encrypted (dbcrypt), plus the cost of one
    decryption measured in-process."""
    import base64
    import os

    from broker.dbcrypt import Cipher, key_digest

    db = await factory.create("product")
    key = os.urandom(32)
    cipher = Cipher([key])
    user = uuid.UUID(pb.GetOIDCAccessTokenRequest.FromString(body.read_bytes()[5:]).user_id)
    await db.execute("INSERT INTO users (id, email, username) VALUES ($1, 'bench@x', 'bench')", user)
    await db.execute(
        "INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (1, $1, $2)",
        key_digest(key),
        cipher.encrypt("coder")[0],
    )
    await db.execute(
        "INSERT INTO user_links (user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry,"
        " oauth_access_token_key_id, oauth_refresh_token_key_id) VALUES ($1, 'oidc', $2, $3, $4, $5, $5)",
        user,
        cipher.encrypt("bench-token-0123456789")[0],
        cipher.encrypt("bench-refresh")[0],
        datetime.now(UTC) + timedelta(days=30),
        key_digest(key),
    )
    stored, key_id = cipher.encrypt("bench-token-0123456789")
    n = 20000
    started = time.perf_counter()
    for _ in range(n):
        cipher.decrypt(stored, key_id, check_active=False)
    decrypt_us = (time.perf_counter() - started) / n * 1e6
    env = broker_env(
        db, BROKER_LOG_LEVEL="INFO", BROKER_DB_POOL_MAX="10", BROKER_ENCRYPTION_KEYS=base64.b64encode(key).decode()
    )
    broker = BrokerProcess(env, tmp / "encrypted.log", metrics=True)
    with grpc.insecure_channel(broker.target) as channel:
        one = pb_grpc.TokenBrokerStub(channel).GetOIDCAccessToken(
            pb.GetOIDCAccessTokenRequest(user_id=str(user)), timeout=5
        )
    assert one.access_token == "bench-token-0123456789"
    runs = [h2load(broker.port, body, len(frame(one.SerializeToString()))) for _ in range(2)]
    broker.stop()
    return {"decrypt_us": round(decrypt_us, 2), "h2load": runs}


def otlp_sink() -> tuple[str, Any]:
    """A local stand-in for an OTLP/HTTP collector: accepts every export with 200."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def traced(
    db: Any, tmp: Path, body: Path, expected: int, endpoint: str, sampler: str, arg: str
) -> list[dict[str, float]]:
    env = broker_env(
        db,
        BROKER_LOG_LEVEL="INFO",
        BROKER_DB_POOL_MAX="10",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_TRACES_SAMPLER=sampler,
        OTEL_TRACES_SAMPLER_ARG=arg,
    )
    broker = BrokerProcess(env, tmp / f"traced-{sampler}-{arg}.log", metrics=True)
    runs = [h2load(broker.port, body, expected) for _ in range(2)]
    broker.stop()
    return runs


async def main() -> None:
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client (make bench does this)")
    server = PgServer()
    factory = DatabaseFactory(server)
    db = await factory.create("plain")
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        user = uuid.uuid4()
        await db.insert_link(user, "bench-token-0123456789", "bench-refresh", datetime.now(UTC) + timedelta(days=30))
        body = tmp / "req.bin"
        body.write_bytes(frame(pb.GetOIDCAccessTokenRequest(user_id=str(user)).SerializeToString()))

        echo_port = free_port()
        echo = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server", str(echo_port)], cwd=ROOT, stdout=subprocess.PIPE
        )
        procs.append(echo)
        assert echo.stdout is not None
        assert echo.stdout.readline().strip() == b"ready"
        # Production defaults: INFO logging with one audit line per request, metrics on.
        broker = BrokerProcess(
            broker_env(db, BROKER_LOG_LEVEL="INFO", BROKER_DB_POOL_MAX="10"), tmp / "b.log", metrics=True
        )

        expected = len(frame(ANSWER.SerializeToString()))
        with grpc.insecure_channel(broker.target) as channel:
            one = pb_grpc.TokenBrokerStub(channel).GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(user)), timeout=5
            )
        assert one.status == pb.TOKEN_STATUS_VALID
        expected_broker = len(frame(one.SerializeToString()))
        baseline = h2load(echo_port, body, expected)
        measured = h2load(broker.port, body, expected_broker)
        baseline2 = h2load(echo_port, body, expected)
        measured2 = h2load(broker.port, body, expected_broker)
        rss = {"broker_kib": rss_kib(broker.proc.pid), "echo_kib": rss_kib(echo.pid)}
        broker.stop()
        encrypted = await encrypted_valid_token(factory, tmp, body)
        sink_url, sink = otlp_sink()
        tracing = {
            "sampled_100": traced(db, tmp, body, expected_broker, sink_url, "always_on", "1"),
            "sampled_1": traced(db, tmp, body, expected_broker, sink_url, "traceidratio", "0.01"),
        }
        sink.shutdown()
        bouncer = PgBouncer(db.admin_url, db.name, ["token_broker"])
        try:
            via = BrokerProcess(
                broker_env(
                    db,
                    BROKER_LOG_LEVEL="INFO",
                    BROKER_DB_POOL_MAX="10",
                    BROKER_DATABASE_URL=bouncer.url(db.service_url),
                    BROKER_DB_STATEMENT_CACHE="false",
                ),
                tmp / "pgbouncer.log",
                metrics=True,
            )
            through_bouncer = [h2load(via.port, body, expected_broker) for _ in range(2)]
            via.stop()
        finally:
            bouncer.stop()
        elevation = await elevation_round_trips(db.admin_url, db.service_url, user)

        base_rps = max(baseline["rps"], baseline2["rps"])
        broker_rps = max(measured["rps"], measured2["rps"])
        result: dict[str, Any] = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "postgres": server.kind,
            "h2load": {"requests": REQUESTS, "clients": CLIENTS, "streams_per_client": STREAMS},
            "baseline_echo": [baseline, baseline2],
            "broker_valid_token": [measured, measured2],
            "throughput_ratio_broker_vs_echo": round(broker_rps / base_rps, 3),
            "broker_via_pgbouncer_transaction_no_statement_cache": through_bouncer,
            "encrypted_at_rest": encrypted,
            "tracing": tracing,
            "throughput_ratio_tracing_vs_off": {
                name: round(max(r["rps"] for r in runs) / broker_rps, 3) for name, runs in tracing.items()
            },
            "throughput_ratio_encrypted_vs_plain": round(max(r["rps"] for r in encrypted["h2load"]) / broker_rps, 3),
            "throughput_ratio_pgbouncer_vs_direct": round(max(r["rps"] for r in through_bouncer) / broker_rps, 3),
            "memory": {**rss, "ratio": round(rss["broker_kib"] / max(rss["echo_kib"], 1), 2)},
            "elevation": {
                **{k: round(v, 1) for k, v in elevation.items()},
                "ratio_set_role_vs_definer": round(
                    elevation["set_local_role_us"] / elevation["security_definer_us"], 2
                ),
            },
        }
        for run in (
            *result["baseline_echo"],
            *result["broker_valid_token"],
            *through_bouncer,
            *encrypted["h2load"],
            *tracing["sampled_100"],
            *tracing["sampled_1"],
        ):
            if run["ok_by_bytes"] != REQUESTS:
                raise SystemExit(f"h2load: only {run['ok_by_bytes']} of {REQUESTS} answers had the expected size")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(
            f"\nbroker / bare grpc.aio echo throughput: {result['throughput_ratio_broker_vs_echo']:.2f}  "
            f"({broker_rps:.0f} vs {base_rps:.0f} req/s)"
        )
        print(
            f"valid-token read: SECURITY DEFINER {elevation['security_definer_us']:.0f} us vs SET LOCAL ROLE "
            f"{elevation['set_local_role_us']:.0f} us ({result['elevation']['ratio_set_role_vs_definer']}x)"
        )
        print(
            "valid token through PgBouncer (transaction pooling, no statement cache) vs direct: "
            f"{result['throughput_ratio_pgbouncer_vs_direct']:.2f}"
        )
        print(
            f"valid token encrypted at rest vs plain: {result['throughput_ratio_encrypted_vs_plain']:.2f}; "
            f"decrypting one token: {encrypted['decrypt_us']:.1f} us"
        )
        print(f"tracing on vs off (throughput): {result['throughput_ratio_tracing_vs_off']}")
        print(f"RSS after load: broker {rss['broker_kib'] / 1024:.1f} MiB vs echo {rss['echo_kib'] / 1024:.1f} MiB")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        await factory.drop_all()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
