-- Link events (issue 25): the recorded state of links that need a new login, and the outbox of their changes.
-- A link's state and its event are written in one transaction, by the SECURITY DEFINER functions in
-- repeatable_access.sql; the service role reaches none of these tables directly.

-- A link known to need a new login. `fingerprint` is a SHA-256 over the SHA-256s of the link's access and refresh
-- tokens when that was decided (never a token): while the link still has those tokens, every replica answers
-- REAUTH_REQUIRED without sending the refresh token again; once they differ (a new login), the link has recovered.
CREATE TABLE IF NOT EXISTS token_broker.link_state (
    user_id pg_catalog.uuid PRIMARY KEY,
    fingerprint pg_catalog.bytea NOT NULL,
    error pg_catalog.text NOT NULL,
    since pg_catalog.timestamptz NOT NULL
);

-- The outbox. Every transaction that writes an event takes one advisory lock first and holds it to its commit (the
-- writes are the last statements before the commit): ids are taken and committed in one order, so a reader that sees
-- an id has seen every lower one, and the stream's cursor is simply the last id seen.
-- `webhook`: pending (to deliver), delivered, failed (retry period over), none (no webhook configured).
CREATE TABLE IF NOT EXISTS token_broker.link_events (
    id pg_catalog.int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type pg_catalog.text NOT NULL,
    user_id pg_catalog.uuid NOT NULL,
    occurred_at pg_catalog.timestamptz NOT NULL,
    detail pg_catalog.jsonb NOT NULL,
    webhook pg_catalog.text NOT NULL,
    attempts pg_catalog.int4 NOT NULL DEFAULT 0,
    next_attempt_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(),
    claimed_by pg_catalog.text,
    claimed_until pg_catalog.timestamptz,
    settled_at pg_catalog.timestamptz
);
-- The highest id the retention has deleted: a cursor below it may have missed events (OUT_OF_RANGE).
CREATE TABLE IF NOT EXISTS token_broker.link_events_pruned (
    one pg_catalog.bool PRIMARY KEY DEFAULT true CHECK (one),
    through pg_catalog.int8 NOT NULL
);
CREATE INDEX IF NOT EXISTS link_events_pending ON token_broker.link_events (user_id, id)
    WHERE webhook OPERATOR(pg_catalog.=) 'pending';
CREATE INDEX IF NOT EXISTS link_events_age ON token_broker.link_events (occurred_at);

-- The webhook endpoint as the database knows it (the SHA-256 of its URL, never the URL): a 410 stops it for every
-- replica until BROKER_WEBHOOK_URL changes.
CREATE TABLE IF NOT EXISTS token_broker.webhook_endpoint (
    one pg_catalog.bool PRIMARY KEY DEFAULT true CHECK (one),
    url_sha256 pg_catalog.bytea NOT NULL,
    stopped_at pg_catalog.timestamptz
);
