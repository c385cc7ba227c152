-- Re-applied on every migrate: roles, column grants and the SECURITY DEFINER functions. Idempotent.
-- The service role comes from the setting token_broker.service_role (BROKER_DB_SERVICE_ROLE).
DO $$
DECLARE
    svc text := current_setting('token_broker.service_role');
    has_users boolean := to_regclass('public.users') IS NOT NULL;
    account_expr text;
    account_join text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = svc) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', svc);
    END IF;

    -- The login role may touch no table directly, only EXECUTE the broker's functions.
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', svc);
    EXECUTE format('GRANT USAGE ON SCHEMA token_broker TO %I', svc);

    -- The elevated role: only the columns the broker needs; update only tokens, key ids and expiry.
    REVOKE ALL ON public.user_links FROM token_broker_elevated;
    GRANT SELECT (user_id, login_type, oauth_access_token, oauth_refresh_token, oauth_expiry,
                  oauth_access_token_key_id, oauth_refresh_token_key_id)
        ON public.user_links TO token_broker_elevated;
    GRANT UPDATE (oauth_access_token, oauth_refresh_token, oauth_expiry,
                  oauth_access_token_key_id, oauth_refresh_token_key_id)
        ON public.user_links TO token_broker_elevated;

    IF has_users THEN
        -- Account state, and the product's trigger on user_links, which reads users.deleted as the writing role.
        REVOKE ALL ON public.users FROM token_broker_elevated;
        GRANT SELECT (id, status, deleted) ON public.users TO token_broker_elevated;
        account_expr := 'COALESCE(u.deleted OR u.status::text = ''suspended'', false)';
        account_join := 'LEFT JOIN public.users u ON u.id = l.user_id';
    ELSE
        account_expr := 'false';
        account_join := '';
    END IF;

    -- Function owners need CREATE on the schema only while ownership is transferred.
    GRANT CREATE ON SCHEMA token_broker TO token_broker_elevated;

    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION token_broker.get_oidc_link(p_user_id uuid)
        RETURNS TABLE (access_token text, refresh_token text, expiry timestamptz,
                       access_key_id text, refresh_key_id text, account_disabled boolean)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        AS $body$
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s
            FROM public.user_links l %s
            WHERE l.user_id = p_user_id AND l.login_type = 'oidc'
        $body$ $f$, account_expr, account_join);

    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION token_broker.lock_oidc_link(p_user_id uuid)
        RETURNS TABLE (access_token text, refresh_token text, expiry timestamptz,
                       access_key_id text, refresh_key_id text, account_disabled boolean)
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        AS $body$
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s
            FROM public.user_links l %s
            WHERE l.user_id = p_user_id AND l.login_type = 'oidc'
            FOR UPDATE OF l
        $body$ $f$, account_expr, account_join);

    -- Compare-and-set: writes only over the refresh token that was sent (or the new one, for an idempotent retry).
    CREATE OR REPLACE FUNCTION token_broker.store_refreshed(
        p_user_id uuid, p_expected_refresh text, p_access text, p_refresh text, p_expiry timestamptz)
    RETURNS boolean
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    AS $body$
        WITH updated AS (
            UPDATE public.user_links
            SET oauth_access_token = p_access,
                oauth_refresh_token = p_refresh,
                oauth_expiry = p_expiry,
                oauth_access_token_key_id = NULL,
                oauth_refresh_token_key_id = NULL
            WHERE user_id = p_user_id AND login_type = 'oidc'
              AND oauth_refresh_token IN (p_expected_refresh, p_refresh)
            RETURNING 1
        )
        SELECT count(*) > 0 FROM updated
    $body$;

    ALTER FUNCTION token_broker.get_oidc_link(uuid) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.lock_oidc_link(uuid) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.store_refreshed(uuid, text, text, text, timestamptz) OWNER TO token_broker_elevated;
    REVOKE CREATE ON SCHEMA token_broker FROM token_broker_elevated;

    REVOKE ALL ON FUNCTION token_broker.get_oidc_link(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.lock_oidc_link(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.store_refreshed(uuid, text, text, text, timestamptz) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.get_oidc_link(uuid) TO %I', svc);
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.lock_oidc_link(uuid) TO %I', svc);
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.store_refreshed(uuid, text, text, text, timestamptz) TO %I',
                   svc);
END
$$;
