"""Several processes on one port (BROKER_WORKERS): the supervisor that runs them, and readiness across them.

- `readiness`: each worker's readiness record, read by whichever worker a probe lands on; the supervisor's pid and a
  worker's refusal reason, shared through the same directory;
- `supervisor`: starts the workers, forwards signals, restarts the dead, serves /metrics for all. It needs
  prometheus-client (the `server` extra), so it is imported as `broker.workers.supervisor`, not from here: the
  client CLI imports this package from the base distribution.
"""

from broker.workers.readiness import WorkerReadiness, record_refusal, supervisor_pid

__all__ = ["WorkerReadiness", "record_refusal", "supervisor_pid"]
