-- Broker-owned bookkeeping: which link's refresh token is at the IdP right now (or was answered and not yet written).
-- A replica that takes the row lock after another replica's connection died mid-refresh sees the marker and does not
-- send the same (possibly already rotated) refresh token again. Only a SHA-256 of the refresh token is stored.
CREATE TABLE IF NOT EXISTS token_broker.refresh_in_flight (
    user_id uuid PRIMARY KEY,
    refresh_sha256 bytea NOT NULL,
    started_at timestamptz NOT NULL
);
