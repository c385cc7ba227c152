-- The in-flight marker's holder proves it is alive by refreshing heartbeat_at while its IdP call or its write-back
-- retry runs. A marker whose heartbeat stopped belongs to a holder that is gone (crashed, killed, or cut off).
ALTER TABLE token_broker.refresh_in_flight
    ADD COLUMN IF NOT EXISTS heartbeat_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp();
