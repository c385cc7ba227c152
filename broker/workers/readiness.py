"""What the workers of one supervisor (BROKER_WORKERS > 1) tell each other and the supervisor through the directory
it shares with them (BROKER_WORKERS_DIR).

Readiness: a probe lands on whichever worker the kernel picks, so each worker answers for the pod. Every worker
records its own readiness there, and the token service is SERVING while at least one worker's record is fresh and
ready: a worker that died or is restarting has no bound socket, so the kernel sends it no connection, and the others
serve the pod's calls meanwhile. A worker that hangs stops refreshing its record, which then no longer counts.

Refusals: a worker that refuses its configuration (exit 2) leaves the reason there, for the supervisor's own line.
The supervisor leaves its pid there, for the workers' check that it still runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path


class WorkerReadiness:
    def __init__(self, directory: Path, index: int, count: int, stale_after: float) -> None:
        self._directory = directory
        self._index = index
        self._count = count
        self._stale_after = stale_after

    def _path(self, index: int) -> Path:
        return self._directory / f"ready-{index}"

    @staticmethod
    def forget(directory: Path, index: int) -> None:
        """The supervisor saw worker `index` exit: its record goes at once."""
        (directory / f"ready-{index}").unlink(missing_ok=True)

    def report(self, ready: bool) -> None:
        """Record this worker's own readiness (atomically: a reader sees the old or the new record)."""
        tmp = self._directory / f".ready-{self._index}.tmp"
        tmp.write_text("1" if ready else "0")
        os.replace(tmp, self._path(self._index))

    def any_ready(self) -> bool:
        """At least one worker (this one included) serves: its record is fresh and ready."""
        now = time.time()
        for index in range(self._count):
            path = self._path(index)
            try:
                if path.read_text() == "1" and now - path.stat().st_mtime <= self._stale_after:
                    return True
            except OSError:
                continue
        return False


def record_supervisor(directory: Path) -> None:
    """In the supervisor, before it starts a worker: its pid, for the workers' orphan check."""
    (directory / "supervisor.pid").write_text(str(os.getpid()))


def supervisor_pid(directory: Path) -> int:
    """In a worker: its supervisor's pid. Read rather than taken from getppid() when the worker has started: a worker
    whose supervisor died while it was starting has been re-parented by then, and must still see it gone."""
    try:
        return int((directory / "supervisor.pid").read_text())
    except (OSError, ValueError):
        return os.getppid()


def record_refusal(env: Mapping[str, str], reason: str) -> None:
    """In a worker that refuses its configuration: leave `reason` (a ConfigError's message, which never carries a
    secret) for the supervisor. BROKER_WORKERS_DIR and BROKER_WORKER_INDEX are the supervisor's own, set for each
    worker; read here too because the refusal may be the settings themselves."""
    directory, index = env.get("BROKER_WORKERS_DIR"), env.get("BROKER_WORKER_INDEX", "")
    if directory and index.isdigit():
        with contextlib.suppress(OSError):
            _refusal_path(Path(directory), int(index)).write_text(reason)


def take_refusal(directory: Path, index: int) -> str | None:
    """In the supervisor, after worker `index` exited 2: the reason it left, if any (read once)."""
    path = _refusal_path(directory, index)
    try:
        reason = path.read_text().strip()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    return reason or None


def _refusal_path(directory: Path, index: int) -> Path:
    return directory / f"refused-{index}"
