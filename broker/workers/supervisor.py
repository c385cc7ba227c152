"""`serve` with BROKER_WORKERS > 1: one supervisor process and N workers serving the same port.

Each worker is a whole broker (`python -m broker serve` with BROKER_WORKER_INDEX set): its own event loop, pool,
single-flight, circuit breaker and write-back. The kernel spreads new connections over the workers (SO_REUSEPORT,
grpc's default on Linux); one HTTP/2 connection always stays on one worker. Refresh safety holds across workers as it
holds across replicas: the row lock and the in-flight marker in PostgreSQL.

The supervisor forwards SIGTERM/SIGINT to every worker at once (each drains by the usual rules), restarts a worker
that died (with backoff), serves /metrics for all of them (prometheus-client's multiprocess mode), and keeps the
port reserved when it was chosen by the kernel (port 0).

Exit 2 from a worker means a configuration it refuses (the reason it left in the shared directory goes into the
supervisor's line): every worker stops and the supervisor exits 2. Any other exit is restarted, including a worker
that could not open its pool (exit 1): the others keep serving. A (re)starting worker opens its pool before it binds
the port: until then the kernel sends it no connection (SO_REUSEPORT spreads connections over bound sockets only), so
a worker that cannot reach the database never takes a call.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from broker.config import Settings
from broker.errors import ConfigError
from broker.telemetry.procmetrics import forget_runtime
from broker.workers.readiness import WorkerReadiness, record_supervisor, take_refusal

log = logging.getLogger("broker.supervisor")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 30.0  # a worker that ran this long restarts without backoff


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = _BACKOFF_FIRST
        self.restart_at = 0.0


class Supervisor:
    """Runs `settings.workers` workers until SIGTERM or SIGINT; returns the exit code."""

    def __init__(self, settings: Settings, env: Mapping[str, str]) -> None:
        self._settings = settings
        self._env = dict(env)
        self._stopping = False
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._reserved: list[socket.socket] = []

    def run(self) -> int:
        s = self._settings
        shared = Path(tempfile.mkdtemp(prefix="token-broker-workers-"))
        listen = self._reserve(s.listen, "BROKER_LISTEN")
        health = self._reserve(s.health_listen, "BROKER_HEALTH_LISTEN") if s.health_listen else ""
        self._env.update(
            BROKER_LISTEN=listen,
            BROKER_HEALTH_LISTEN=health,
            BROKER_METRICS_LISTEN="",  # the supervisor serves the metrics of all workers
            BROKER_WORKERS=str(len(self._workers)),
            BROKER_WORKERS_DIR=str(shared),
            PROMETHEUS_MULTIPROC_DIR=str(shared / "metrics"),
        )
        (shared / "metrics").mkdir()
        record_supervisor(shared)
        metrics_stop = self._serve_metrics(shared) if s.metrics_listen else None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "token-broker supervisor serving",
            extra={"listen": listen, "workers": len(self._workers), "metrics": s.metrics_listen or None},
        )
        try:
            for worker in self._workers:
                self._start(worker)
            return self._watch(shared)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if metrics_stop is not None:
                metrics_stop()
            for sock in self._reserved:
                sock.close()
            shutil.rmtree(shared, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            self._stopping = True
            log.info("shutdown requested; stopping every worker", extra={"signal": signal.Signals(signum).name})
        for worker in self._workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)

    def _start(self, worker: _Worker) -> None:
        env = {**self._env, "BROKER_WORKER_INDEX": str(worker.index)}
        worker.proc = subprocess.Popen([sys.executable, "-m", "broker", "serve"], env=env)
        worker.started = time.monotonic()

    def _watch(self, shared: Path) -> int:
        s = self._settings
        kill_at: float | None = None
        worst = 0
        while True:
            now = time.monotonic()
            if self._stopping and kill_at is None:
                kill_at = now + s.drain_delay + s.shutdown_grace + 5.0
            alive = 0
            for worker in self._workers:
                proc = worker.proc
                if proc is None:
                    if not self._stopping and now >= worker.restart_at:
                        self._start(worker)
                        alive += 1
                    continue
                code = proc.poll()
                if code is None:
                    alive += 1
                    if kill_at is not None and now >= kill_at:
                        log.error("worker did not stop in time; killing it", extra={"worker": worker.index})
                        proc.kill()
                    continue
                WorkerReadiness.forget(shared, worker.index)
                forget_runtime(shared, worker.index)
                _mark_dead(shared / "metrics", proc.pid)
                worker.proc = None
                if self._stopping:
                    # Ended by the SIGTERM we forwarded before it installed its handler (still starting): a stop.
                    stopped = 0 if code == -signal.SIGTERM else code
                    worst = max(worst, stopped if stopped >= 0 else 128 - stopped)
                    continue
                if code == 2:  # a configuration error (and only that): restarting cannot help
                    reason = take_refusal(shared, worker.index) or "no reason left; see the worker's output above"
                    log.error(
                        f"worker refused its configuration: {reason}; stopping every worker",
                        extra={"worker": worker.index},
                    )
                    worst = 2
                    self._on_signal(signal.SIGTERM, None)
                    continue
                # Anything else (the database unreachable at start-up, a crash, an OOM kill) may pass: restart.
                ran = now - worker.started
                worker.backoff = _BACKOFF_FIRST if ran >= _STABLE_AFTER else min(worker.backoff * 2, _BACKOFF_MAX)
                worker.restart_at = now + (0.0 if ran >= _STABLE_AFTER else worker.backoff)
                log.error(
                    "worker exited; restarting it",
                    extra={"worker": worker.index, "exit_code": code, "restart_in_seconds": worker.restart_at - now},
                )
            if self._stopping and alive == 0:
                log.info("token-broker stopped", extra={"exit_code": worst})
                return worst
            time.sleep(0.05)

    def _reserve(self, listen: str, name: str) -> str:
        """host:port with a concrete port. A port of 0 is chosen now and held (SO_REUSEPORT, not listening) for
        as long as the supervisor runs, so workers started later bind the same one."""
        host, _, port_text = listen.rpartition(":")
        if int(port_text) != 0:
            return listen
        bare = host.strip("[]")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                None if bare in ("*", "") else bare, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"{name}: cannot bind {listen}: {exc}") from None
        self._reserved.append(sock)
        return f"{host}:{sock.getsockname()[1]}"

    def _serve_metrics(self, shared: Path) -> Callable[[], None]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from broker.telemetry.metrics import serve_metrics
        from broker.telemetry.procmetrics import ProcessesCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(shared / "metrics"))  # type: ignore[no-untyped-call]  # untyped
        registry.register(ProcessesCollector(shared, self._live_workers))
        return serve_metrics(self._settings.metrics_listen, registry)[1]

    def _live_workers(self) -> list[tuple[int, int]]:
        """(index, pid) of the workers running (called on the metrics thread: reads, never reaps)."""
        return [(w.index, p.pid) for w in self._workers if (p := w.proc) is not None and p.returncode is None]


def _mark_dead(directory: Path, pid: int) -> None:
    """A dead worker's live gauges leave the sums (its counters stay: they only ever add up)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]  # untyped


def supervise(settings: Settings, env: Mapping[str, str]) -> int:
    return Supervisor(settings, env).run()
