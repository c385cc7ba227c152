-- Access tokens an upstream rejected (a caller reported the SHA-256 with rejected_token_sha256), so that no worker
-- and no replica serves such a token again, even when the forced refresh that should have replaced it failed. One
-- row per link: the SHA-256 of the plain access token (the broker hashes it; never the token). A row counts only
-- while the link still holds that very token: a refresh or a new login makes it inert.
CREATE TABLE IF NOT EXISTS token_broker.rejected_access (
    user_id pg_catalog.uuid PRIMARY KEY,
    access_sha256 pg_catalog.bytea NOT NULL,
    rejected_at pg_catalog.timestamptz NOT NULL
);
