"""Run the real broker for a test: in-process (App on port 0) or as a `python -m broker serve` subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from broker.app import App
from broker.config import Settings
from broker.core.interfaces import IdentityProvider, LinkStore
from broker.idp import OidcRefresher
from broker.postgres.embedded import free_port
from broker.postgres.store import PostgresStore
from broker.telemetry.tracing import Tracer
from broker.v1 import token_broker_pb2 as pb
from broker.v1 import token_broker_pb2_grpc as pb_grpc
from tests.support.idp import CLIENT_ID, CLIENT_SECRET, OidcTestProvider
from tests.support.pg import Database

ROOT = Path(__file__).resolve().parents[2]


def broker_env(db: Database | None, idp: OidcTestProvider | None = None, **overrides: str) -> dict[str, str]:
    env = {
        "BROKER_LISTEN": "127.0.0.1:0",
        "BROKER_METRICS_LISTEN": "127.0.0.1:0",
        "BROKER_HEALTH_INTERVAL": "0.2",
        "BROKER_SHUTDOWN_GRACE": "1",
        "BROKER_WORKERS": "1",  # the worker tests ask for more
    }
    if db is not None:
        env["BROKER_DATABASE_URL"] = db.service_url
    if idp is not None:
        env.update(
            BROKER_OIDC_ISSUER=idp.issuer, BROKER_OIDC_CLIENT_ID=CLIENT_ID, BROKER_OIDC_CLIENT_SECRET=CLIENT_SECRET
        )
    env.update(overrides)
    return env


@dataclass
class RunningBroker:
    app: App
    channel: grpc.aio.Channel
    stub: pb_grpc.TokenBrokerStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    async def get(self, user_id: object, timeout: float = 10.0) -> pb.GetOIDCAccessTokenResponse:
        response: pb.GetOIDCAccessTokenResponse = await self.stub.GetOIDCAccessToken(
            pb.GetOIDCAccessTokenRequest(user_id=str(user_id)), timeout=timeout
        )
        return response

    def metrics_text(self) -> str:
        r = httpx2.get(f"http://127.0.0.1:{self.app.metrics_port}/metrics", timeout=5)
        r.raise_for_status()
        return r.text

    def sample(self, name: str, **labels: str) -> float:
        """The value of one sample scraped over HTTP and parsed with prometheus-client's parser."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0


async def call_broker(
    target: str,
    user_id: object,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 5.0,
) -> pb.GetOIDCAccessTokenResponse:
    """One GetOIDCAccessToken on a channel of its own (TLS with `credentials`), as a separate caller would."""
    channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    async with channel:
        response: pb.GetOIDCAccessTokenResponse = await pb_grpc.TokenBrokerStub(channel).GetOIDCAccessToken(
            pb.GetOIDCAccessTokenRequest(user_id=str(user_id)), timeout=timeout, metadata=metadata or None
        )
        return response


async def warm_discovery(b: RunningBroker) -> None:
    """Run OIDC discovery now, so that a fault injected next hits only the token endpoint."""
    assert isinstance(b.app.idp, OidcRefresher)
    await b.app.idp.token_endpoint()


@asynccontextmanager
async def running_broker(
    env: Mapping[str, str],
    *,
    store: LinkStore | None = None,
    idp: IdentityProvider | None = None,
    tracer: Tracer | None = None,
) -> AsyncIterator[RunningBroker]:
    app = App(Settings.from_env(env), store=store, idp=idp, tracer=tracer)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield RunningBroker(app, channel, pb_grpc.TokenBrokerStub(channel))
    finally:
        await channel.close()
        await app.stop()


@asynccontextmanager
async def postgres_store(db: Database) -> AsyncIterator[PostgresStore]:
    """A PostgresStore of the test's own (to wrap with a fault); its read connections go back before its pool
    closes, which waits for them."""
    pool = await PostgresStore.create_pool(db.service_url, min_size=1, max_size=4, connect_timeout=5)
    store = PostgresStore(pool)
    try:
        yield store
    finally:
        await store.close()
        await pool.close()


class BrokerProcess:
    """`python -m broker serve` as a separate OS process (a replica)."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        metrics: bool = False,
        stdout: int | None = None,
        port: int = 0,
    ) -> None:
        """`stdout`: a file descriptor for the process's stdout (then only stderr goes to `log_path`); `port`: the
        port to serve on (0: a free one)."""
        self.port = port or free_port()
        self.metrics_port = free_port() if metrics else 0
        full = dict(os.environ)
        full.update(env)
        full["BROKER_LISTEN"] = f"127.0.0.1:{self.port}"
        full["BROKER_METRICS_LISTEN"] = f"127.0.0.1:{self.metrics_port}" if metrics else ""
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve"],
            env=full,
            cwd=ROOT,
            stdout=self._log if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else self._log,
            start_new_session=True,  # its own process group, so a test can SIGKILL all of it
        )
        self.target = f"127.0.0.1:{self.port}"
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"broker exited: {self.log_path.read_text()[-2000:]}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service="broker.v1.TokenBroker"), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        self._wait_every_worker(deadline)
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("broker did not become ready")

    def _wait_every_worker(self, deadline: float) -> None:
        """With workers the pod is ready once one serves: wait until every worker does (as the log says)."""
        while True:
            entries = []
            for line in self.log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # the line being written
                    entries.append(json.loads(line))
            workers = next((e["workers"] for e in entries if e.get("msg") == "token-broker supervisor serving"), 0)
            if sum(e.get("msg") == "token-broker serving" for e in entries) >= workers:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every worker started: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the replica's process group, as an OOM kill or a lost node would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.returncode is not None:
            if not self._log.closed:
                self._log.close()
            return self.proc.returncode
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc
