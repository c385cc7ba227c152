"""The gRPC edge: where a request enters and what it may do there. No SQL, no HTTP.

- `entry`: RpcEntry, where every RPC enters (admit, count, audit, map errors), and the record of one call;
- `service`: the servicer, proto <-> domain, the deadline budget;
- `listen`: the server, its ports, health and readiness;
- `callers`: caller authentication (certificate SANs, caller tokens, the allowlist, per-caller limits);
- `mesh`: identities a service-mesh sidecar verified (Envoy's XFCC, Linkerd's l5d-client-id);
- `tls`: server certificates reloaded on change;
- `resourcefile`: BROKER_RESOURCES_FILE, the resource policy (which caller may get a token for which resource),
  re-read on change.
"""

from broker.server import listen
from broker.server.callers import CallerGate, CallerTokens, load_caller_tokens
from broker.server.entry import RpcEntry
from broker.server.mesh import MeshIdentity
from broker.server.resourcefile import ReloadingPolicy, load_policy
from broker.server.service import SERVICE_NAME, PolicySource, TokenBrokerServicer
from broker.server.tls import ReloadingCertificates

__all__ = [
    "SERVICE_NAME",
    "CallerGate",
    "CallerTokens",
    "MeshIdentity",
    "PolicySource",
    "ReloadingCertificates",
    "ReloadingPolicy",
    "RpcEntry",
    "TokenBrokerServicer",
    "listen",
    "load_caller_tokens",
    "load_policy",
]
