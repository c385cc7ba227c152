-- When a link was last refreshed because an upstream rejected its access token (a "forced" refresh), so that every
-- replica bounds such refreshes to one per link per BROKER_FORCED_REFRESH_INTERVAL.
CREATE TABLE IF NOT EXISTS token_broker.forced_refresh (
    user_id pg_catalog.uuid PRIMARY KEY,
    at pg_catalog.timestamptz NOT NULL
);
