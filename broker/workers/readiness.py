"""Readiness across the workers of one supervisor (BROKER_WORKERS > 1).

A probe lands on whichever worker the kernel picks, so each worker answers for all of them: every worker records its
own readiness in the directory the supervisor shares, and the token service is SERVING only while every worker's
record is fresh and ready. A worker that died (or hangs) stops refreshing its record and the pod turns unready.
"""

from __future__ import annotations

import os
import time
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
        """The supervisor saw worker `index` exit: its record goes at once (the others turn unready)."""
        (directory / f"ready-{index}").unlink(missing_ok=True)

    def report(self, ready: bool) -> None:
        """Record this worker's own readiness (atomically: a reader sees the old or the new record)."""
        tmp = self._directory / f".ready-{self._index}.tmp"
        tmp.write_text("1" if ready else "0")
        os.replace(tmp, self._path(self._index))

    def all_ready(self) -> bool:
        now = time.time()
        for index in range(self._count):
            path = self._path(index)
            try:
                if path.read_text() != "1" or now - path.stat().st_mtime > self._stale_after:
                    return False
            except OSError:
                return False
        return True
