-- Tokens exchanged at the IdP for one resource (RFC 8693 / RFC 8707), shared by every replica: one row per
-- (user, resource, audience, scope). The token is stored as the links are (the product's dbcrypt ciphertext when
-- encryption keys are configured, with its key id), bound to the login token it was exchanged from by that token's
-- SHA-256 (never the token). A row without a token is a remembered refusal (denied_until). Only the elevated role
-- may read or write it, through the SECURITY DEFINER functions in repeatable_access.sql.
CREATE TABLE IF NOT EXISTS token_broker.exchanged_tokens (
    user_id pg_catalog.uuid NOT NULL,
    resource pg_catalog.text NOT NULL,
    audience pg_catalog.text NOT NULL DEFAULT '',
    scope pg_catalog.text NOT NULL DEFAULT '',
    subject_sha256 pg_catalog.bytea NOT NULL,
    access_token pg_catalog.text NOT NULL DEFAULT '',
    access_key_id pg_catalog.text,
    expiry pg_catalog.timestamptz,
    exchanged_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    denied_until pg_catalog.timestamptz,
    denied_error pg_catalog.text,
    forced_at pg_catalog.timestamptz,
    PRIMARY KEY (user_id, resource, audience, scope)
);
REVOKE ALL ON token_broker.exchanged_tokens FROM PUBLIC;
