"""The refresh core. Each guarantee has one home:

- a refresh token goes to the IdP from one caller at a time: refresher.Refresher (single-flight in the process),
  locked.LockedRefresh (the row lock and the in-flight marker across replicas; the only IdP call);
- a marker whose holder is alive is respected, one whose holder is gone is taken over once: liveness.Liveness;
- once the IdP has answered, the rotated tokens are never dropped: writeback.WriteBack;
- a refresh token the IdP rejected is not sent again for a while: rejections.RejectedTokens;
- during an IdP outage callers get a fast answer, and Retry-After is honoured: guarded.GuardedIdentityProvider;
- a caller that cancels or times out abandons only its own wait: refresher.Refresher;
- what a failure answers, in one table: outcomes.FAILURE_STATUS.
"""

from broker.core.refresh.refresher import Refresher
from broker.core.refresh.settings import RefreshSettings

__all__ = ["RefreshSettings", "Refresher"]
