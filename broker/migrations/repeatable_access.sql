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

    -- Its own bookkeeping table, and nothing else of the broker's schema.
    REVOKE ALL ON token_broker.refresh_in_flight FROM PUBLIC;
    GRANT SELECT, INSERT, UPDATE, DELETE ON token_broker.refresh_in_flight TO token_broker_elevated;
    GRANT USAGE ON SCHEMA token_broker TO token_broker_elevated;

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

    -- Versions before 0002 returned no in_flight_seconds; CREATE OR REPLACE cannot change a return type.
    IF to_regprocedure('token_broker.lock_oidc_link(uuid)') IS NOT NULL
       AND pg_get_function_result(to_regprocedure('token_broker.lock_oidc_link(uuid)')) NOT LIKE '%in_flight_seconds%'
    THEN
        DROP FUNCTION token_broker.lock_oidc_link(uuid);
    END IF;
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION token_broker.lock_oidc_link(p_user_id uuid)
        RETURNS TABLE (access_token text, refresh_token text, expiry timestamptz,
                       access_key_id text, refresh_key_id text, account_disabled boolean,
                       in_flight_seconds double precision)
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, public, pg_temp
        AS $body$
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s,
                   extract(epoch FROM clock_timestamp() - f.started_at)::double precision
            FROM public.user_links l %s
            LEFT JOIN token_broker.refresh_in_flight f
              ON f.user_id = l.user_id AND f.refresh_sha256 = sha256(convert_to(l.oauth_refresh_token, 'UTF8'))
            WHERE l.user_id = p_user_id AND l.login_type = 'oidc'
            FOR UPDATE OF l
        $body$ $f$, account_expr, account_join);

    -- Marks the link's current refresh token as sent to the IdP; committed on its own connection, before the call.
    CREATE OR REPLACE FUNCTION token_broker.begin_refresh(p_user_id uuid)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    AS $body$
        INSERT INTO token_broker.refresh_in_flight (user_id, refresh_sha256, started_at)
        SELECT user_id, sha256(convert_to(oauth_refresh_token, 'UTF8')), clock_timestamp()
        FROM public.user_links WHERE user_id = p_user_id AND login_type = 'oidc'
        ON CONFLICT (user_id) DO UPDATE
            SET refresh_sha256 = EXCLUDED.refresh_sha256, started_at = EXCLUDED.started_at
    $body$;

    -- The IdP call failed: the refresh token was not (or not knowably) rotated; lift the marker.
    CREATE OR REPLACE FUNCTION token_broker.abandon_refresh(p_user_id uuid)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    AS $body$
        DELETE FROM token_broker.refresh_in_flight WHERE user_id = p_user_id
    $body$;

    -- Compare-and-set: writes only over the refresh token that was sent (or the new one, for an idempotent retry).
    CREATE OR REPLACE FUNCTION token_broker.store_refreshed(
        p_user_id uuid, p_expected_refresh text, p_access text, p_refresh text, p_expiry timestamptz)
    RETURNS boolean
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    AS $body$
        WITH done AS (
            DELETE FROM token_broker.refresh_in_flight WHERE user_id = p_user_id
        ), updated AS (
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
    ALTER FUNCTION token_broker.begin_refresh(uuid) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.abandon_refresh(uuid) OWNER TO token_broker_elevated;
    REVOKE CREATE ON SCHEMA token_broker FROM token_broker_elevated;

    REVOKE ALL ON FUNCTION token_broker.get_oidc_link(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.lock_oidc_link(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.store_refreshed(uuid, text, text, text, timestamptz) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.begin_refresh(uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.abandon_refresh(uuid) FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.begin_refresh(uuid) TO %I', svc);
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.abandon_refresh(uuid) TO %I', svc);
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.get_oidc_link(uuid) TO %I', svc);
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.lock_oidc_link(uuid) TO %I', svc);
    EXECUTE format('GRANT EXECUTE ON FUNCTION token_broker.store_refreshed(uuid, text, text, text, timestamptz) TO %I',
                   svc);
END
$$;
