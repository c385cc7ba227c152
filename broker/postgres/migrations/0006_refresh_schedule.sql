-- Broker-owned bookkeeping for living beside the product's own refreshers (one row per user a broker served):
-- - seen_at: a caller last asked a broker for this user's token (the user is "active" within BROKER_ACTIVE_WINDOW);
-- - due_at: when an active user's token is refreshed in the background, before it enters the product's window
--   (NULL: nothing scheduled); claimed_until: a replica took the due refresh until then, so others skip it;
-- - lifetime_seconds: the access-token lifetime a broker last saw the IdP grant (never refresh before half of it);
-- - refresh_sha256 / previous_sha256: SHA-256 of the refresh token a broker last wrote or saw, and the one before
--   (a different one is a rotation the broker did not make); foreign_logged_at: the last INFO line about one.
-- Only hashes of refresh tokens are stored, never a token. Kept in the database so every replica agrees and it
-- survives a deploy.
CREATE TABLE IF NOT EXISTS token_broker.refresh_schedule (
    user_id pg_catalog.uuid PRIMARY KEY,
    seen_at pg_catalog.timestamptz NOT NULL,
    due_at pg_catalog.timestamptz,
    claimed_until pg_catalog.timestamptz,
    lifetime_seconds pg_catalog.float8,
    refresh_sha256 pg_catalog.bytea,
    previous_sha256 pg_catalog.bytea,
    foreign_logged_at pg_catalog.timestamptz
);
-- The scheduler reads only the rows that are due: an index range scan, whatever the number of users.
CREATE INDEX IF NOT EXISTS refresh_schedule_due ON token_broker.refresh_schedule (due_at) WHERE due_at IS NOT NULL;
