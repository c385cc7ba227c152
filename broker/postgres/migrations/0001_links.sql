-- The links table and its enum type, created only where the product has not created them already.
-- On the product's own database both exist (with foreign keys and a trigger) and are left exactly as they are.
DO $$
BEGIN
    IF pg_catalog.to_regtype('public.login_type') IS NULL THEN
        CREATE TYPE public.login_type AS ENUM
            ('password', 'github', 'oidc', 'token', 'none', 'oauth2_provider_app');
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS public.user_links (
    user_id uuid NOT NULL,
    login_type public.login_type NOT NULL,
    linked_id text DEFAULT ''::text NOT NULL,
    oauth_access_token text DEFAULT ''::text NOT NULL,
    oauth_refresh_token text DEFAULT ''::text NOT NULL,
    oauth_expiry timestamptz DEFAULT '0001-01-01 00:00:00+00'::timestamptz NOT NULL,
    oauth_access_token_key_id text,
    oauth_refresh_token_key_id text,
    claims jsonb DEFAULT '{}'::jsonb NOT NULL,
    PRIMARY KEY (user_id, login_type)
);

-- The elevated role: NOLOGIN, owns the broker's SECURITY DEFINER functions and nothing else.
DO $$
BEGIN
    CREATE ROLE token_broker_elevated NOLOGIN;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;
