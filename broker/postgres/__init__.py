"""PostgreSQL: every SQL statement and everything that touches the product's database.

- `store`: PostgresStore, the LinkStore adapter (asyncpg errors become domain errors);
- `lanes`: valid-token reads on held connections, batched when every lane is busy;
- `keepalive`: TCP keepalive and a user timeout on database sockets;
- `exchanged`: PostgresExchangeStore, tokens exchanged for one resource (the ExchangeStore adapter);
- `codec`: rows <-> links, the product's stored formats;
- `dbcrypt`: tokens encrypted at rest as the product stores them;
- `statements`: prepared statements named per pool, and the cache turned off when a pooler loses them;
- `elevated`: the check that no one but the migrating admin can reach the elevated role;
- `migrate` and `migrations/`: the broker's schema and the elevated role's functions;
- `embedded`: an embedded PostgreSQL for `token-broker dev` and the tests.
"""

from broker.postgres.dbcrypt import Cipher, parse_keys
from broker.postgres.elevated import ElevatedRoleGate
from broker.postgres.exchanged import PostgresExchangeStore
from broker.postgres.migrate import migrate
from broker.postgres.store import PostgresSchedule, PostgresStore

__all__ = [
    "Cipher",
    "ElevatedRoleGate",
    "PostgresExchangeStore",
    "PostgresSchedule",
    "PostgresStore",
    "migrate",
    "parse_keys",
]
