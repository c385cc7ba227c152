"""Load and measurement primitives of `make bench`: h2load runs (throughput, latency percentiles from its per-request
log, success checked by response bytes), CPU seconds of process trees from /proc, and peak RSS."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class Profile:
    """One h2load shape: `requests` calls over `clients` connections with `streams` in flight on each, optionally
    paced at `rate` requests per second in all."""

    requests: int
    clients: int
    streams: int
    rate: float | None = None

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


PRODUCTION = Profile(30000, 50, 10)  # 500 in flight, as in the measurement
ONE = Profile(3000, 1, 1)
EIGHT = Profile(16000, 8, 1)


def h2load(
    port: int,
    body: Path,
    expected_response_bytes: int,
    profile: Profile = PRODUCTION,
    headers: tuple[str, ...] = (),
) -> dict[str, float]:
    """One run; raises when any answer did not have the expected size (h2load counts a failed gRPC call as 200).
    `headers`: extra request headers ("name: value"), e.g. a caller token."""
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log") as log:
        args = ["h2load", "-n", str(profile.requests), "-c", str(profile.clients), "-m", str(profile.streams)]
        if profile.rate is not None:
            args += ["--rps", f"{max(profile.rate / profile.clients, 0.1):.2f}"]
        args += [
            "--log-file",
            log.name,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            *(arg for h in headers for arg in ("-H", h)),
            "-d",
            str(body),
            f"http://127.0.0.1:{port}/broker.v1.TokenBroker/GetOIDCAccessToken",
        ]
        out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
        micros = sorted(int(line.split("\t")[2]) for line in Path(log.name).read_text().splitlines() if line)
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    data = int(re.search(r"traffic: .*?\((\d+)\) data", out).group(1))  # type: ignore[union-attr]
    ok = round(data / expected_response_bytes)
    if ok != profile.requests:
        raise SystemExit(f"h2load: only {ok} of {profile.requests} answers had the expected size")
    return {
        "rps": rps,
        "p50_ms": round(_percentile(micros, 0.50) / 1000, 3),
        "p99_ms": round(_percentile(micros, 0.99) / 1000, 3),
    }


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def tree(root: int) -> list[int]:
    """`root` and its descendants (a supervisor and its workers)."""
    parents: dict[int, int] = {}
    for pid in _all_pids():
        fields = _stat(pid)
        if fields is not None:
            parents[pid] = int(fields[1])
    found = [root]
    frontier = [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


def postgres_pids() -> list[int]:
    pids = []
    for pid in _all_pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
                pids.append(pid)
        except OSError:
            pass
    return pids


class CpuMeter:
    """CPU seconds (user + system) spent by a set of processes between two readings. Processes that start or end
    in between count from their first or to their last reading (PostgreSQL backends live as long as the pool)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._start: dict[int, int] = {}

    def _ticks(self) -> dict[int, int]:
        ticks = {}
        for pid in self._pids():
            fields = _stat(pid)
            if fields is not None:
                ticks[pid] = int(fields[11]) + int(fields[12])
        return ticks

    def start(self) -> None:
        self._start = self._ticks()

    def seconds(self) -> float:
        end = self._ticks()
        return sum(t - self._start.get(pid, 0) for pid, t in end.items()) / _TICK


def _kib(pids: list[int], name: str, field: str) -> int:
    """Sum over the processes of one `field:` line (in kB) of /proc/<pid>/<name>; gone processes count 0."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def peak_rss_kib(pids: list[int]) -> int:
    """Sum of the processes' peak resident set (VmHWM)."""
    return _kib(pids, "status", "VmHWM:")


def pss_kib(pids: list[int]) -> int:
    """Sum of the processes' proportional set size: shared pages counted once in all (what the pod's memory
    cgroup is charged, where RSS counts a shared page in every process)."""
    return _kib(pids, "smaps_rollup", "Pss:")


def rss_each_kib(pids: list[int]) -> list[int]:
    """Each process's peak RSS (VmHWM)."""
    return [peak_rss_kib([pid]) for pid in pids]


def median(values: list[float]) -> float:
    return float(statistics.median(values))
