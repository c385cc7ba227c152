"""`make bench`: the broker's valid-token path at production defaults (INFO logging with one audit line per
request, metrics on, the default worker count), as ratios against baselines measured in the same run.

1. Throughput: h2load (`-c 50 -m 10`, 30,000 calls) against the broker and against a bare grpc.aio server of the same
   contract with a constant answer, in 3 alternated rounds; the median of the per-round ratios. Success is checked
   by response bytes, since h2load counts HTTP 200 with a non-zero grpc-status as success.
2. CPU microseconds per request, from /proc: the broker's processes, PostgreSQL's, the bare server's.
3. p50/p99 latency with 1, 8 and 500 calls in flight; p99 at half of the broker's maximum throughput, paced, against
   the bare server's at the same rate (P5).
4. P3: the same load with 1,000,000 links in user_links (loaded with COPY) against 1,000.
5. Peak RSS of the broker (all its processes) and of the bare server.
6. Costs of options: PgBouncer, encryption at rest, tracing; the elevation mechanism (SECURITY DEFINER vs SET ROLE).
7. The cached exchanged-token path (a request with `resource`) against passthrough on one broker (bench/exchange.py).
Results go to stdout and bench/results/latest.json. BENCH_QUICK=1 runs 1 to 3 (results in quick.json).
"""

from __future__ import annotations

import asyncio
import json
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
from bench.exchange import cached_exchange
from bench.load import (
    EIGHT,
    ONE,
    PRODUCTION,
    CpuMeter,
    Profile,
    frame,
    h2load,
    median,
    peak_rss_kib,
    postgres_pids,
    pss_kib,
    rss_each_kib,
    tree,
)
from broker.postgres.embedded import free_port
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.broker import ROOT, BrokerProcess, broker_env
from tests.support.pg import DatabaseFactory, PgServer
from tests.support.pgbouncer import PgBouncer


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
            await fn.fetchrow("SELECT * FROM token_broker.read_oidc_link($1)", user)

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

    from broker.postgres.dbcrypt import Cipher, key_digest

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
    broker = broker_process(db, tmp, "encrypted", BROKER_ENCRYPTION_KEYS=base64.b64encode(key).decode())
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
    broker = broker_process(
        db,
        tmp,
        f"traced-{sampler}-{arg}",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_TRACES_SAMPLER=sampler,
        OTEL_TRACES_SAMPLER_ARG=arg,
    )
    runs = [h2load(broker.port, body, expected) for _ in range(2)]
    broker.stop()
    return runs


PROD_ENV = {"BROKER_LOG_LEVEL": "INFO", "BROKER_WORKERS": "auto"}  # production defaults: metrics on, workers by CPUs


def broker_process(db: Any, tmp: Path, name: str, **env: str) -> BrokerProcess:
    return BrokerProcess(broker_env(db, None, **{**PROD_ENV, **env}), tmp / f"{name}.log", metrics=True)


def per_request_us(seconds: float, requests: int) -> float:
    return round(seconds / requests * 1e6, 1)


def measured(port: int, body: Path, expected: int, profile: Profile, pids: Any) -> dict[str, float]:
    """One h2load run with the CPU spent by `pids()` and by PostgreSQL per request."""
    own, pg = CpuMeter(pids), CpuMeter(postgres_pids)
    own.start()
    pg.start()
    run = h2load(port, body, expected, profile)
    run["cpu_us"] = per_request_us(own.seconds(), profile.requests)
    run["pg_cpu_us"] = per_request_us(pg.seconds(), profile.requests)
    return run


async def load_links(db: Any, count: int) -> None:
    """`count` oidc links with valid tokens, loaded with COPY."""
    expiry = datetime.now(UTC) + timedelta(days=30)
    conn = await db.admin()
    try:
        batch = 100_000
        for offset in range(0, count, batch):
            rows = [
                (uuid.uuid4(), "oidc", f"access-{offset + i}", f"refresh-{offset + i}", expiry)
                for i in range(min(batch, count - offset))
            ]
            await conn.copy_records_to_table(
                "user_links",
                records=rows,
                columns=["user_id", "login_type", "oauth_access_token", "oauth_refresh_token", "oauth_expiry"],
            )
        await conn.execute("ANALYZE user_links")
    finally:
        await conn.close()


async def main() -> None:
    import os

    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client (make bench does this)")
    quick = os.environ.get("BENCH_QUICK") == "1"
    server = PgServer()
    factory = DatabaseFactory(server)
    db = await factory.create("plain")
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        user = uuid.uuid4()
        await load_links(db, 999)
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
        broker = broker_process(db, tmp, "broker")
        expected = len(frame(ANSWER.SerializeToString()))
        with grpc.insecure_channel(broker.target) as channel:
            one = pb_grpc.TokenBrokerStub(channel).GetOIDCAccessToken(
                pb.GetOIDCAccessTokenRequest(user_id=str(user)), timeout=5
            )
        assert one.status == pb.TOKEN_STATUS_VALID
        expected_broker = len(frame(one.SerializeToString()))

        def broker_pids() -> list[int]:
            return tree(broker.proc.pid)  # the supervisor and its workers

        def echo_pids() -> list[int]:
            return [echo.pid]

        rounds: list[dict[str, Any]] = []
        for _ in range(3):
            bare = measured(echo_port, body, expected, PRODUCTION, echo_pids)
            ours = measured(broker.port, body, expected_broker, PRODUCTION, broker_pids)
            rounds.append({"bare": bare, "broker": ours, "ratio": round(ours["rps"] / bare["rps"], 3)})
        ratio = median([r["ratio"] for r in rounds])
        result: dict[str, Any] = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "postgres": server.kind,
            "cores": len(os.sched_getaffinity(0)),
            "load": {"requests": PRODUCTION.requests, "clients": PRODUCTION.clients, "streams": PRODUCTION.streams},
            "rounds": rounds,
            "throughput_ratio_median": ratio,
            "broker_cpu_us_median": median([r["broker"]["cpu_us"] for r in rounds]),
            "bare_cpu_us_median": median([r["bare"]["cpu_us"] for r in rounds]),
            "postgres_cpu_us_median": median([r["broker"]["pg_cpu_us"] for r in rounds]),
        }
        latency = {}
        for name, profile in (("1", ONE), ("8", EIGHT)):
            latency[name] = {
                "bare": h2load(echo_port, body, expected, profile),
                "broker": h2load(broker.port, body, expected_broker, profile),
            }
        latency["500"] = {
            "bare": {k: median([r["bare"][k] for r in rounds]) for k in ("p50_ms", "p99_ms")},
            "broker": {k: median([r["broker"][k] for r in rounds]) for k in ("p50_ms", "p99_ms")},
        }
        result["latency_by_in_flight"] = latency
        half = median([r["broker"]["rps"] for r in rounds]) / 2
        paced = Profile(int(half * 15), PRODUCTION.clients, PRODUCTION.streams, rate=half)
        p5_bare = h2load(echo_port, body, expected, paced)
        p5_broker = h2load(broker.port, body, expected_broker, paced)
        result["p5_half_max_rate"] = {
            "rate": round(half),
            "bare": p5_bare,
            "broker": p5_broker,
            "p99_ratio": round(p5_broker["p99_ms"] / p5_bare["p99_ms"], 2),
        }
        result["memory"] = {
            "broker_peak_kib": peak_rss_kib(broker_pids()),
            "broker_peak_kib_each": rss_each_kib(broker_pids()),
            "broker_pss_kib": pss_kib(broker_pids()),
            "processes": len(broker_pids()),
            "bare_peak_kib": peak_rss_kib(echo_pids()),
        }
        broker.stop()
        result["exchange"] = await cached_exchange(factory, tmp, PROD_ENV, pairs=1 if quick else 3)
        if not quick:
            result["p3_one_million_links"] = await million_links(factory, tmp)
            result["options"] = await options(factory, db, tmp, user, body, expected_broker, ratio, rounds)
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / ("quick.json" if quick else "latest.json")).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        summary(result)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        await factory.drop_all()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def million_links(factory: DatabaseFactory, tmp: Path) -> dict[str, Any]:
    """Throughput with 1,000 and with 1,000,000 links: both brokers up, runs alternated, the median of the
    per-pair ratios."""
    brokers: dict[int, tuple[BrokerProcess, Path, int]] = {}
    try:
        for count in (1_000, 1_000_000):
            db = await factory.create("plain")
            user = uuid.uuid4()
            await load_links(db, count - 1)
            expiry = datetime.now(UTC) + timedelta(days=30)
            await db.insert_link(user, "bench-token-0123456789", "bench-refresh", expiry)
            body = tmp / f"req-{count}.bin"
            body.write_bytes(frame(pb.GetOIDCAccessTokenRequest(user_id=str(user)).SerializeToString()))
            broker = broker_process(db, tmp, f"links-{count}")
            with grpc.insecure_channel(broker.target) as channel:
                one = pb_grpc.TokenBrokerStub(channel).GetOIDCAccessToken(
                    pb.GetOIDCAccessTokenRequest(user_id=str(user)), timeout=5
                )
            brokers[count] = (broker, body, len(frame(one.SerializeToString())))
        pairs: list[dict[str, Any]] = []
        for _ in range(5):
            small, large = (h2load(b.port, body, size) for b, body, size in (brokers[1_000], brokers[1_000_000]))
            pairs.append({"1000": small, "1000000": large, "ratio": round(large["rps"] / small["rps"], 3)})
    finally:
        for broker, _, _ in brokers.values():
            broker.stop()
    return {"pairs": pairs, "ratio_1m_vs_1k": median([p["ratio"] for p in pairs])}


async def options(
    factory: DatabaseFactory, db: Any, tmp: Path, user: uuid.UUID, body: Path, expected: int, ratio: float, rounds: Any
) -> dict[str, Any]:
    """What PgBouncer, encryption at rest and tracing cost, against the plain broker's median throughput."""
    base = median([r["broker"]["rps"] for r in rounds])
    encrypted = await encrypted_valid_token(factory, tmp, body)
    sink_url, sink = otlp_sink()
    tracing = {
        "sampled_100": traced(db, tmp, body, expected, sink_url, "always_on", "1"),
        "sampled_1": traced(db, tmp, body, expected, sink_url, "traceidratio", "0.01"),
    }
    sink.shutdown()
    bouncer = PgBouncer(db.admin_url, db.name, ["token_broker"])
    try:
        via = broker_process(
            db,
            tmp,
            "pgbouncer",
            BROKER_DATABASE_URL=bouncer.url(db.service_url),
            BROKER_DB_STATEMENT_CACHE="false",
        )
        through_bouncer = [h2load(via.port, body, expected) for _ in range(2)]
        via.stop()
    finally:
        bouncer.stop()
    elevation = await elevation_round_trips(db.admin_url, db.service_url, user)

    def rel(runs: list[dict[str, float]]) -> float:
        return round(median([r["rps"] for r in runs]) / base, 3)

    return {
        "pgbouncer_transaction_no_statement_cache": {"runs": through_bouncer, "ratio_vs_direct": rel(through_bouncer)},
        "encrypted_at_rest": {**encrypted, "ratio_vs_plain": rel(encrypted["h2load"])},
        "tracing": {name: {"runs": runs, "ratio_vs_off": rel(runs)} for name, runs in tracing.items()},
        "elevation": {
            **{k: round(v, 1) for k, v in elevation.items()},
            "ratio_set_role_vs_definer": round(elevation["set_local_role_us"] / elevation["security_definer_us"], 2),
        },
    }


def summary(r: dict[str, Any]) -> None:
    print(f"\nbroker / bare grpc.aio throughput (median of 3 rounds): {r['throughput_ratio_median']:.2f}")
    print(
        f"CPU per request: broker {r['broker_cpu_us_median']:.0f} us, PostgreSQL {r['postgres_cpu_us_median']:.0f}"
        f" us, bare server {r['bare_cpu_us_median']:.0f} us"
    )
    for name, pair in r.get("latency_by_in_flight", {}).items():
        b, e = pair["broker"], pair["bare"]
        print(
            f"{name:>3} in flight: broker p50 {b['p50_ms']} ms p99 {b['p99_ms']} ms;"
            f" bare p50 {e['p50_ms']} ms p99 {e['p99_ms']} ms"
        )
    if "p5_half_max_rate" in r:
        p5 = r["p5_half_max_rate"]
        print(f"P5 at {p5['rate']} req/s: p99 broker / bare = {p5['p99_ratio']}")
    if "exchange" in r:
        print(f"cached exchanged token / passthrough throughput: {r['exchange']['ratio_cached_vs_passthrough']}")
    if "p3_one_million_links" in r:
        print(f"P3 throughput 1,000,000 links / 1,000: {r['p3_one_million_links']['ratio_1m_vs_1k']}")
    m = r["memory"]
    each = ", ".join(f"{k / 1024:.1f}" for k in m["broker_peak_kib_each"])
    print(
        f"memory: broker peak RSS {m['broker_peak_kib'] / 1024:.1f} MiB summed over {m['processes']} processes"
        f" ({each}), PSS {m['broker_pss_kib'] / 1024:.1f} MiB; bare server peak RSS {m['bare_peak_kib'] / 1024:.1f} MiB"
    )
    if "options" in r:
        o = r["options"]
        print(
            f"vs plain: PgBouncer {o['pgbouncer_transaction_no_statement_cache']['ratio_vs_direct']},"
            f" encrypted {o['encrypted_at_rest']['ratio_vs_plain']},"
            f" tracing 100% {o['tracing']['sampled_100']['ratio_vs_off']},"
            f" 1% {o['tracing']['sampled_1']['ratio_vs_off']}"
        )
        e = o["elevation"]
        print(f"read: SECURITY DEFINER {e['security_definer_us']} us vs SET LOCAL ROLE {e['set_local_role_us']} us")


if __name__ == "__main__":
    asyncio.run(main())
