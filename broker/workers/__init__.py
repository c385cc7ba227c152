"""Several processes on one port (BROKER_WORKERS): the supervisor that runs them, and readiness across them.

- `supervisor`: starts the workers, forwards signals, restarts the dead, serves /metrics for all;
- `readiness`: each worker's readiness record, read by whichever worker a probe lands on.
"""

from broker.workers.readiness import WorkerReadiness
from broker.workers.supervisor import supervise

__all__ = ["WorkerReadiness", "supervise"]
