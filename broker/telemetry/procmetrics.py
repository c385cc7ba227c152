"""The process metrics of every process of a supervisor (BROKER_WORKERS > 1), each labelled `worker`.

prometheus-client's multiprocess mode shares counters, gauges and histograms through files, but not the default
collectors' `process_*`, `python_gc_*` and `python_info`. The supervisor's /metrics exports them for itself
(worker="supervisor") and for each live worker (worker="0", "1", ...): the `process_*` series it reads from /proc for
the worker's pid at scrape time (current even while that worker's event loop is stuck), and the in-process
`python_gc_*` and `python_info` series each worker writes to the shared directory every second. So dashboards that
sum by pod keep working, and one worker's memory or CPU can be told from the others'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

SUPERVISOR = "supervisor"


def _runtime_path(directory: Path, index: int) -> Path:
    return directory / f"runtime-{index}.json"


class RuntimeSnapshot:
    """In a worker: writes its `python_gc_*` and `python_info` samples for the supervisor (atomically)."""

    def __init__(self, directory: Path, index: int) -> None:
        self._path = _runtime_path(directory, index)
        self._tmp = directory / f".runtime-{index}.tmp"
        self._collectors = (GCCollector(registry=CollectorRegistry()), PlatformCollector(registry=None))

    def write(self) -> None:
        families = [
            [f.name, f.documentation, f.type, f.unit, [[s.name, s.labels, s.value] for s in f.samples]]
            for c in self._collectors
            for f in c.collect()
        ]
        self._tmp.write_text(json.dumps(families))
        os.replace(self._tmp, self._path)


def forget_runtime(directory: Path, index: int) -> None:
    """The supervisor saw worker `index` exit: its last snapshot goes."""
    _runtime_path(directory, index).unlink(missing_ok=True)


class ProcessesCollector(Collector):
    """In the supervisor: the process metrics of itself and of each live worker, `live()` giving (index, pid)."""

    def __init__(self, directory: Path, live: Callable[[], list[tuple[int, int]]]) -> None:
        self._directory = directory
        self._live = live
        self._own = (
            ProcessCollector(registry=None),
            GCCollector(registry=CollectorRegistry()),  # a registry it can register with, read by no one
            PlatformCollector(registry=None),
        )

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for collector in self._own:
            _merge(merged, collector.collect(), SUPERVISOR)
        for index, pid in self._live():
            _merge(merged, ProcessCollector(pid=_constant(pid), registry=None).collect(), str(index))
            _merge(merged, self._runtime(index), str(index))
        return merged.values()

    def _runtime(self, index: int) -> list[Metric]:
        try:
            families = json.loads(_runtime_path(self._directory, index).read_text())
        except (OSError, ValueError):
            return []  # not written yet (the worker is starting)
        out = []
        for name, documentation, kind, unit, samples in families:
            family = Metric(name, documentation, kind, unit)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, labels, value)
            out.append(family)
        return out


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def _merge(merged: dict[str, Metric], families: Iterable[Metric], worker: str) -> None:
    """Add `families`' samples, labelled `worker`, to the family of the same name in `merged` (one per name)."""
    for f in families:
        family = merged.get(f.name)
        if family is None:
            family = merged[f.name] = Metric(f.name, f.documentation, f.type, f.unit)
        for s in f.samples:
            family.add_sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)
