"""What the broker tells operators: JSON logs (`logs`), traces (`tracing`) and Prometheus metrics (`metrics`, and
`procmetrics`: every worker's process metrics under one supervisor).

`logs` and `tracing` need nothing beyond the standard library until tracing is switched on, so the configuration
and the client CLI may import them from the base distribution; `metrics` needs prometheus-client (the `server`
extra) and is imported as `broker.telemetry.metrics`.
"""

from broker.telemetry.logs import UserLog
from broker.telemetry.tracing import NULL_TRACER, OtelTracer, Tracer, sdk_provider

__all__ = ["NULL_TRACER", "OtelTracer", "Tracer", "UserLog", "sdk_provider"]
