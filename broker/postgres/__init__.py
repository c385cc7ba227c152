"""PostgreSQL: every SQL statement and everything that touches the product's database.

- `store`: PostgresStore, the LinkStore adapter (asyncpg errors become domain errors);
- `lanes`: valid-token reads on held connections, batched when every lane is busy;
- `keepalive`: TCP keepalive and a user timeout on database sockets;
- `exchanged`: PostgresExchangeStore, tokens exchanged for one resource (the ExchangeStore adapter);
- `codec`: rows <-> links, the product's stored formats;
- `dbcrypt`: tokens encrypted at rest as the product stores them;
- `migrate` and `migrations/`: the broker's schema and the elevated role's functions;
- `embedded`: an embedded PostgreSQL for `token-broker dev` and the tests.
"""

from broker.postgres.dbcrypt import Cipher, parse_keys
from broker.postgres.exchanged import PostgresExchangeStore
from broker.postgres.migrate import migrate
from broker.postgres.store import PostgresStore

__all__ = ["Cipher", "PostgresExchangeStore", "PostgresStore", "migrate", "parse_keys"]
