-- Re-applied on every migrate: roles, column grants and the SECURITY DEFINER functions. Idempotent.
-- The service role comes from the setting token_broker.service_role (BROKER_DB_SERVICE_ROLE).
--
-- Search-path hygiene (the functions run as token_broker_elevated, this file as the admin): every function, operator
-- and type is written with its schema (pg_catalog.format, OPERATOR(pg_catalog.=), public.login_type), so an object
-- that someone else created in public can never be picked instead, not even as a "better match" for an argument
-- type. migrate runs this file with `SET LOCAL search_path = pg_catalog, pg_temp`. The functions' own search_path is
-- `pg_catalog, pg_temp`; store_refreshed alone also has public (after pg_catalog), because the product's trigger on
-- user_links reads `users` unqualified as the writing role; migrate makes sure the service role cannot CREATE there.
DO $$
DECLARE
    svc text := pg_catalog.current_setting('token_broker.service_role');
    has_users boolean := pg_catalog.to_regclass('public.users') IS NOT NULL;
    has_dbcrypt boolean := pg_catalog.to_regclass('public.dbcrypt_keys') IS NOT NULL;
    account_expr text;
    account_join text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) svc) THEN
        EXECUTE pg_catalog.format('CREATE ROLE %I LOGIN', svc);
    END IF;

    -- The login role may touch no table directly, only EXECUTE the broker's functions; and it may create nothing in
    -- public, where its objects could be looked up by the product's own code (the trigger above, or anyone's queries).
    EXECUTE pg_catalog.format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', svc);
    EXECUTE pg_catalog.format('REVOKE CREATE ON SCHEMA public FROM %I', svc);
    EXECUTE pg_catalog.format('REVOKE CREATE ON SCHEMA token_broker FROM %I', svc);
    IF pg_catalog.has_schema_privilege(svc, 'public', 'CREATE') THEN
        RAISE EXCEPTION 'the service role % can still CREATE in schema public (through PUBLIC or a role it is a '
            'member of), so it could plant functions or operators there', svc
            USING HINT = 'Run REVOKE CREATE ON SCHEMA public FROM PUBLIC (the default since PostgreSQL 15) and revoke '
                         'membership in roles that own or may create in public, then migrate again.';
    END IF;
    IF pg_catalog.has_schema_privilege(svc, 'token_broker', 'CREATE') THEN
        RAISE EXCEPTION 'the service role % can CREATE in schema token_broker (through a role it is a member of)', svc
            USING HINT = 'The service role must be a plain login role that owns nothing of the database.';
    END IF;
    EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA token_broker TO %I', svc);
    -- A session of the service role that leaves a transaction open (a lock on a product row) or runs away is ended
    -- by the server. The broker's own refresh transaction sets tighter values with SET LOCAL.
    EXECUTE pg_catalog.format('ALTER ROLE %I SET idle_in_transaction_session_timeout = %L', svc, '60s');
    EXECUTE pg_catalog.format('ALTER ROLE %I SET statement_timeout = %L', svc, '30s');

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
        account_expr := 'COALESCE(u.deleted OR u.status::pg_catalog.text OPERATOR(pg_catalog.=) ''suspended'', false)';
        account_join := 'LEFT JOIN public.users u ON u.id OPERATOR(pg_catalog.=) l.user_id';
    ELSE
        account_expr := 'false';
        account_join := '';
    END IF;

    -- Its own bookkeeping table, and nothing else of the broker's schema.
    REVOKE ALL ON token_broker.refresh_in_flight FROM PUBLIC;
    GRANT SELECT, INSERT, UPDATE, DELETE ON token_broker.refresh_in_flight TO token_broker_elevated;
    REVOKE ALL ON token_broker.forced_refresh FROM PUBLIC;
    GRANT SELECT, INSERT, UPDATE ON token_broker.forced_refresh TO token_broker_elevated;
    GRANT USAGE ON SCHEMA token_broker TO token_broker_elevated;

    -- Function owners need CREATE on the schema only while ownership is transferred.
    GRANT CREATE ON SCHEMA token_broker TO token_broker_elevated;

    -- The reads are plpgsql with a generic plan: an SQL-language function is inlined and planned again on every
    -- call (about 200 us of server CPU against 57). get_oidc_links answers a batch of users in one call; a user with
    -- no oidc link has no row. get_oidc_link (one user) stays for replicas of older versions during a rolling deploy.
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.get_oidc_link(p_user_id pg_catalog.uuid)
        RETURNS TABLE (access_token pg_catalog.text, refresh_token pg_catalog.text, expiry pg_catalog.timestamptz,
                       access_key_id pg_catalog.text, refresh_key_id pg_catalog.text,
                       account_disabled pg_catalog.bool)
        LANGUAGE plpgsql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET plan_cache_mode = force_generic_plan
        AS $body$ BEGIN
            RETURN QUERY
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s
            FROM public.user_links l %s
            WHERE l.user_id OPERATOR(pg_catalog.=) p_user_id
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type;
        END $body$ $f$, account_expr, account_join);
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.get_oidc_links(p_user_ids pg_catalog.uuid[])
        RETURNS TABLE (user_id pg_catalog.uuid, access_token pg_catalog.text, refresh_token pg_catalog.text,
                       expiry pg_catalog.timestamptz, access_key_id pg_catalog.text,
                       refresh_key_id pg_catalog.text, account_disabled pg_catalog.bool)
        LANGUAGE plpgsql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET plan_cache_mode = force_generic_plan
        AS $body$ BEGIN
            RETURN QUERY
            SELECT l.user_id, l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s
            FROM public.user_links l %s
            WHERE l.user_id OPERATOR(pg_catalog.=) ANY (p_user_ids)
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type;
        END $body$ $f$, account_expr, account_join);

    -- Older versions returned no (or another) marker column; CREATE OR REPLACE cannot change a return type.
    IF pg_catalog.to_regprocedure('token_broker.lock_oidc_link(uuid)') IS NOT NULL
       AND pg_catalog.pg_get_function_result(pg_catalog.to_regprocedure('token_broker.lock_oidc_link(uuid)'))
           OPERATOR(pg_catalog.!~~) '%marker_sha256%'
    THEN
        DROP FUNCTION token_broker.lock_oidc_link(pg_catalog.uuid);
    END IF;
    -- Before 0003 the marker was lifted by user id alone, which could lift another holder's marker; before 0004 the
    -- database hashed the stored refresh token (ciphertext, with encryption at rest): now the broker hashes the
    -- plain token and passes the hash, and the write-back also carries the key ids.
    DROP FUNCTION IF EXISTS token_broker.abandon_refresh(pg_catalog.uuid);
    DROP FUNCTION IF EXISTS token_broker.begin_refresh(pg_catalog.uuid);
    DROP FUNCTION IF EXISTS token_broker.store_refreshed(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
                                                         pg_catalog.text, pg_catalog.timestamptz);
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.lock_oidc_link(p_user_id pg_catalog.uuid)
        RETURNS TABLE (access_token pg_catalog.text, refresh_token pg_catalog.text, expiry pg_catalog.timestamptz,
                       access_key_id pg_catalog.text, refresh_key_id pg_catalog.text,
                       account_disabled pg_catalog.bool, marker_sha256 pg_catalog.bytea,
                       marker_idle_seconds pg_catalog.float8, forced_seconds_ago pg_catalog.float8)
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $body$
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s, f.refresh_sha256,
                   pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) f.heartbeat_at),
                   pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) fr.at)
            FROM public.user_links l %s
            LEFT JOIN token_broker.refresh_in_flight f ON f.user_id OPERATOR(pg_catalog.=) l.user_id
            LEFT JOIN token_broker.forced_refresh fr ON fr.user_id OPERATOR(pg_catalog.=) l.user_id
            WHERE l.user_id OPERATOR(pg_catalog.=) p_user_id
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type
            FOR UPDATE OF l
        $body$ $f$, account_expr, account_join);

    -- Marks the link's current refresh token (its SHA-256, of the plain token) as sent to the IdP; committed on its
    -- own connection, before the call. Also how a replica takes over the marker of a holder that is gone.
    CREATE OR REPLACE FUNCTION token_broker.begin_refresh(p_user_id pg_catalog.uuid, p_refresh_sha256 pg_catalog.bytea)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        INSERT INTO token_broker.refresh_in_flight (user_id, refresh_sha256, started_at, heartbeat_at)
        VALUES (p_user_id, p_refresh_sha256, pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp())
        ON CONFLICT (user_id) DO UPDATE
            SET refresh_sha256 = EXCLUDED.refresh_sha256, started_at = EXCLUDED.started_at,
                heartbeat_at = EXCLUDED.heartbeat_at
    $body$;

    -- A forced refresh (an upstream rejected the access token) was written: called in the locked transaction.
    CREATE OR REPLACE FUNCTION token_broker.note_forced_refresh(p_user_id pg_catalog.uuid)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        INSERT INTO token_broker.forced_refresh (user_id, at) VALUES (p_user_id, pg_catalog.clock_timestamp())
        ON CONFLICT (user_id) DO UPDATE SET at = EXCLUDED.at
    $body$;

    -- The holder is alive: one statement per tick for every marker this process holds.
    CREATE OR REPLACE FUNCTION token_broker.heartbeat_refresh(p_user_ids pg_catalog.uuid[],
                                                              p_refresh_sha256 pg_catalog.bytea[])
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        UPDATE token_broker.refresh_in_flight f SET heartbeat_at = pg_catalog.clock_timestamp()
        FROM ROWS FROM (pg_catalog.unnest(p_user_ids), pg_catalog.unnest(p_refresh_sha256)) AS h(user_id, refresh_sha256)
        WHERE f.user_id OPERATOR(pg_catalog.=) h.user_id
          AND f.refresh_sha256 OPERATOR(pg_catalog.=) h.refresh_sha256
    $body$;

    -- The IdP call failed without rotating: lift this holder's marker (never another one's).
    CREATE OR REPLACE FUNCTION token_broker.abandon_refresh(p_user_id pg_catalog.uuid,
                                                            p_refresh_sha256 pg_catalog.bytea)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        DELETE FROM token_broker.refresh_in_flight
        WHERE user_id OPERATOR(pg_catalog.=) p_user_id AND refresh_sha256 OPERATOR(pg_catalog.=) p_refresh_sha256
    $body$;

    -- Compare-and-set: writes only over the refresh token that was sent, as it is stored (or the new one, for an
    -- idempotent retry: encryption is deterministic per value). The marker goes only with a write that happened, and
    -- only the marker of the token that was sent. A NULL expiry is the product's zero time ("never expires").
    -- public is on this function's path (after pg_catalog) only for the product's trigger, which reads `users`.
    CREATE OR REPLACE FUNCTION token_broker.store_refreshed(
        p_user_id pg_catalog.uuid, p_expected_refresh pg_catalog.text, p_access pg_catalog.text,
        p_refresh pg_catalog.text, p_expiry pg_catalog.timestamptz, p_access_key_id pg_catalog.text,
        p_refresh_key_id pg_catalog.text, p_expected_sha256 pg_catalog.bytea)
    RETURNS pg_catalog.bool
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, public, pg_temp
    AS $body$
        WITH updated AS (
            UPDATE public.user_links
            SET oauth_access_token = p_access,
                oauth_refresh_token = p_refresh,
                oauth_expiry = COALESCE(p_expiry, '0001-01-01 00:00:00+00'::pg_catalog.timestamptz),
                oauth_access_token_key_id = p_access_key_id,
                oauth_refresh_token_key_id = p_refresh_key_id
            WHERE user_id OPERATOR(pg_catalog.=) p_user_id
              AND login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type
              AND (oauth_refresh_token OPERATOR(pg_catalog.=) p_expected_refresh
                   OR oauth_refresh_token OPERATOR(pg_catalog.=) p_refresh)
            RETURNING 1
        ), done AS (
            DELETE FROM token_broker.refresh_in_flight
            WHERE user_id OPERATOR(pg_catalog.=) p_user_id
              AND refresh_sha256 OPERATOR(pg_catalog.=) p_expected_sha256
              AND EXISTS (SELECT 1 FROM updated)
        )
        SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM updated
    $body$;

    -- The product's encryption keys, for the start-up check (digests and the test value; never a key).
    IF has_dbcrypt THEN
        REVOKE ALL ON public.dbcrypt_keys FROM token_broker_elevated;
        GRANT SELECT (number, active_key_digest, revoked_key_digest, test) ON public.dbcrypt_keys
            TO token_broker_elevated;
        CREATE OR REPLACE FUNCTION token_broker.get_dbcrypt_keys()
        RETURNS TABLE (active_key_digest pg_catalog.text, revoked_key_digest pg_catalog.text, test pg_catalog.text)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $body$
            SELECT k.active_key_digest, k.revoked_key_digest, k.test FROM public.dbcrypt_keys k ORDER BY k.number
        $body$;
    ELSE
        -- No dbcrypt_keys (the broker's own tables): no keys, so encryption cannot be configured.
        CREATE OR REPLACE FUNCTION token_broker.get_dbcrypt_keys()
        RETURNS TABLE (active_key_digest pg_catalog.text, revoked_key_digest pg_catalog.text, test pg_catalog.text)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $body$ SELECT NULL::pg_catalog.text, NULL::pg_catalog.text, NULL::pg_catalog.text WHERE false $body$;
    END IF;

    ALTER FUNCTION token_broker.get_oidc_link(pg_catalog.uuid) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.get_oidc_links(pg_catalog.uuid[]) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.lock_oidc_link(pg_catalog.uuid) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.store_refreshed(pg_catalog.uuid, pg_catalog.text, pg_catalog.text, pg_catalog.text,
        pg_catalog.timestamptz, pg_catalog.text, pg_catalog.text, pg_catalog.bytea) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.get_dbcrypt_keys() OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.begin_refresh(pg_catalog.uuid, pg_catalog.bytea) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.abandon_refresh(pg_catalog.uuid, pg_catalog.bytea) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.heartbeat_refresh(pg_catalog.uuid[], pg_catalog.bytea[]) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.note_forced_refresh(pg_catalog.uuid) OWNER TO token_broker_elevated;
    -- Tokens exchanged for one resource (0007): the elevated role alone reads and writes them. The lock is a
    -- transaction-scoped advisory lock on the row's key, taken before the IdP call, so every replica exchanges a
    -- key one at a time and re-reads the row under it (a dead holder's lock ends with its connection).
    REVOKE ALL ON token_broker.exchanged_tokens FROM PUBLIC;
    EXECUTE pg_catalog.format('REVOKE ALL ON token_broker.exchanged_tokens FROM %I', svc);
    GRANT SELECT, INSERT, UPDATE, DELETE ON token_broker.exchanged_tokens TO token_broker_elevated;
    CREATE OR REPLACE FUNCTION token_broker.get_exchanged_token(p_user_id pg_catalog.uuid,
        p_resource pg_catalog.text, p_audience pg_catalog.text, p_scope pg_catalog.text)
    RETURNS TABLE (access_token pg_catalog.text, access_key_id pg_catalog.text, expiry pg_catalog.timestamptz,
                   lifetime_seconds pg_catalog.float8, subject_sha256 pg_catalog.bytea,
                   denied_seconds pg_catalog.float8, forced_seconds_ago pg_catalog.float8)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET plan_cache_mode = force_generic_plan
    AS $body$ BEGIN
        -- plpgsql with a generic plan, as get_oidc_link: the cached path runs it on every request.
        RETURN QUERY
        SELECT e.access_token, e.access_key_id, e.expiry,
               pg_catalog.date_part('epoch', e.expiry OPERATOR(pg_catalog.-) e.exchanged_at),
               e.subject_sha256,
               pg_catalog.date_part('epoch', e.denied_until OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp()),
               pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) e.forced_at)
        FROM token_broker.exchanged_tokens e
        WHERE e.user_id OPERATOR(pg_catalog.=) p_user_id AND e.resource OPERATOR(pg_catalog.=) p_resource
          AND e.audience OPERATOR(pg_catalog.=) p_audience AND e.scope OPERATOR(pg_catalog.=) p_scope;
    END $body$;
    -- The cached path in one round trip: the link (as get_oidc_link) and the key's row, joined.
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.get_oidc_link_exchanged(p_user_id pg_catalog.uuid,
            p_resource pg_catalog.text, p_audience pg_catalog.text, p_scope pg_catalog.text)
        RETURNS TABLE (access_token pg_catalog.text, refresh_token pg_catalog.text, expiry pg_catalog.timestamptz,
                       access_key_id pg_catalog.text, refresh_key_id pg_catalog.text,
                       account_disabled pg_catalog.bool,
                       x_access_token pg_catalog.text, x_access_key_id pg_catalog.text,
                       x_expiry pg_catalog.timestamptz, x_lifetime_seconds pg_catalog.float8,
                       x_subject_sha256 pg_catalog.bytea, x_denied_seconds pg_catalog.float8,
                       x_forced_seconds_ago pg_catalog.float8)
        LANGUAGE plpgsql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET plan_cache_mode = force_generic_plan
        AS $body$ BEGIN
            RETURN QUERY
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s,
                   e.access_token, e.access_key_id, e.expiry,
                   pg_catalog.date_part('epoch', e.expiry OPERATOR(pg_catalog.-) e.exchanged_at),
                   e.subject_sha256,
                   pg_catalog.date_part('epoch', e.denied_until OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp()),
                   pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) e.forced_at)
            FROM public.user_links l %s
            LEFT JOIN token_broker.exchanged_tokens e
                   ON e.user_id OPERATOR(pg_catalog.=) l.user_id AND e.resource OPERATOR(pg_catalog.=) p_resource
                  AND e.audience OPERATOR(pg_catalog.=) p_audience AND e.scope OPERATOR(pg_catalog.=) p_scope
            WHERE l.user_id OPERATOR(pg_catalog.=) p_user_id
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type;
        END $body$ $f$, account_expr, account_join);
    CREATE OR REPLACE FUNCTION token_broker.lock_exchanged_token(p_user_id pg_catalog.uuid,
        p_resource pg_catalog.text, p_audience pg_catalog.text, p_scope pg_catalog.text)
    RETURNS TABLE (access_token pg_catalog.text, access_key_id pg_catalog.text, expiry pg_catalog.timestamptz,
                   lifetime_seconds pg_catalog.float8, subject_sha256 pg_catalog.bytea,
                   denied_seconds pg_catalog.float8, forced_seconds_ago pg_catalog.float8)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$ BEGIN
        PERFORM pg_catalog.pg_advisory_xact_lock(1952608869, pg_catalog.hashtext(
            pg_catalog.format('%s|%s|%s|%s', p_user_id, p_resource, p_audience, p_scope)));
        -- A statement after the lock (this function is VOLATILE, so it takes a new snapshot): it sees what the
        -- previous holder committed.
        RETURN QUERY SELECT * FROM token_broker.get_exchanged_token(p_user_id, p_resource, p_audience, p_scope);
    END $body$;
    CREATE OR REPLACE FUNCTION token_broker.store_exchanged_token(p_user_id pg_catalog.uuid,
        p_resource pg_catalog.text, p_audience pg_catalog.text, p_scope pg_catalog.text,
        p_subject_sha256 pg_catalog.bytea, p_access_token pg_catalog.text, p_access_key_id pg_catalog.text,
        p_expiry pg_catalog.timestamptz, p_forced pg_catalog.bool)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        INSERT INTO token_broker.exchanged_tokens AS e (user_id, resource, audience, scope, subject_sha256,
            access_token, access_key_id, expiry, exchanged_at, denied_until, denied_error, forced_at)
        VALUES (p_user_id, p_resource, p_audience, p_scope, p_subject_sha256, p_access_token, p_access_key_id,
            p_expiry, pg_catalog.clock_timestamp(), NULL, NULL,
            CASE WHEN p_forced THEN pg_catalog.clock_timestamp() END)
        ON CONFLICT (user_id, resource, audience, scope) DO UPDATE
            SET subject_sha256 = EXCLUDED.subject_sha256, access_token = EXCLUDED.access_token,
                access_key_id = EXCLUDED.access_key_id, expiry = EXCLUDED.expiry,
                exchanged_at = EXCLUDED.exchanged_at, denied_until = NULL, denied_error = NULL,
                forced_at = COALESCE(EXCLUDED.forced_at, e.forced_at);
        -- The user's other rows that expired long ago go with it (a row is never served after its expiry).
        DELETE FROM token_broker.exchanged_tokens e
        WHERE e.user_id OPERATOR(pg_catalog.=) p_user_id
          AND e.expiry OPERATOR(pg_catalog.<) (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
                                               pg_catalog.make_interval(days => 1))
          AND (e.denied_until IS NULL
               OR e.denied_until OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp());
    $body$;
    CREATE OR REPLACE FUNCTION token_broker.deny_exchange(p_user_id pg_catalog.uuid,
        p_resource pg_catalog.text, p_audience pg_catalog.text, p_scope pg_catalog.text,
        p_subject_sha256 pg_catalog.bytea, p_seconds pg_catalog.float8, p_error pg_catalog.text)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        INSERT INTO token_broker.exchanged_tokens AS e (user_id, resource, audience, scope, subject_sha256,
            access_token, access_key_id, expiry, exchanged_at, denied_until, denied_error)
        VALUES (p_user_id, p_resource, p_audience, p_scope, p_subject_sha256, '', NULL, NULL,
            pg_catalog.clock_timestamp(),
            pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => p_seconds), p_error)
        ON CONFLICT (user_id, resource, audience, scope) DO UPDATE
            SET subject_sha256 = EXCLUDED.subject_sha256, access_token = '', access_key_id = NULL, expiry = NULL,
                exchanged_at = EXCLUDED.exchanged_at, denied_until = EXCLUDED.denied_until,
                denied_error = EXCLUDED.denied_error
    $body$;
    ALTER FUNCTION token_broker.get_exchanged_token(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.get_oidc_link_exchanged(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text) OWNER TO token_broker_elevated;
    REVOKE ALL ON FUNCTION token_broker.get_oidc_link_exchanged(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text) FROM PUBLIC;
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.get_oidc_link_exchanged(pg_catalog.uuid,'
        ' pg_catalog.text, pg_catalog.text, pg_catalog.text) TO %I', svc);
    ALTER FUNCTION token_broker.lock_exchanged_token(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.store_exchanged_token(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text, pg_catalog.bytea, pg_catalog.text, pg_catalog.text, pg_catalog.timestamptz,
        pg_catalog.bool) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.deny_exchange(pg_catalog.uuid, pg_catalog.text, pg_catalog.text, pg_catalog.text,
        pg_catalog.bytea, pg_catalog.float8, pg_catalog.text) OWNER TO token_broker_elevated;
    REVOKE ALL ON FUNCTION token_broker.get_exchanged_token(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.lock_exchanged_token(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.store_exchanged_token(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text, pg_catalog.bytea, pg_catalog.text, pg_catalog.text, pg_catalog.timestamptz,
        pg_catalog.bool) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.deny_exchange(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text, pg_catalog.bytea, pg_catalog.float8, pg_catalog.text) FROM PUBLIC;
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.get_exchanged_token(pg_catalog.uuid,'
        ' pg_catalog.text, pg_catalog.text, pg_catalog.text) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.lock_exchanged_token(pg_catalog.uuid,'
        ' pg_catalog.text, pg_catalog.text, pg_catalog.text) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.store_exchanged_token(pg_catalog.uuid,'
        ' pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.bytea, pg_catalog.text, pg_catalog.text,'
        ' pg_catalog.timestamptz, pg_catalog.bool) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.deny_exchange(pg_catalog.uuid,'
        ' pg_catalog.text, pg_catalog.text, pg_catalog.text, pg_catalog.bytea, pg_catalog.float8, pg_catalog.text)'
        ' TO %I', svc);

    REVOKE CREATE ON SCHEMA token_broker FROM token_broker_elevated;

    REVOKE ALL ON FUNCTION token_broker.get_oidc_link(pg_catalog.uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.get_oidc_links(pg_catalog.uuid[]) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.lock_oidc_link(pg_catalog.uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.store_refreshed(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,
        pg_catalog.text, pg_catalog.timestamptz, pg_catalog.text, pg_catalog.text, pg_catalog.bytea) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.get_dbcrypt_keys() FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.begin_refresh(pg_catalog.uuid, pg_catalog.bytea) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.abandon_refresh(pg_catalog.uuid, pg_catalog.bytea) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.heartbeat_refresh(pg_catalog.uuid[], pg_catalog.bytea[]) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.note_forced_refresh(pg_catalog.uuid) FROM PUBLIC;
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.begin_refresh(pg_catalog.uuid, pg_catalog.bytea) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.get_dbcrypt_keys() TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.abandon_refresh(pg_catalog.uuid, pg_catalog.bytea) TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.heartbeat_refresh(pg_catalog.uuid[], pg_catalog.bytea[]) TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.note_forced_refresh(pg_catalog.uuid) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.get_oidc_link(pg_catalog.uuid) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.get_oidc_links(pg_catalog.uuid[]) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.lock_oidc_link(pg_catalog.uuid) TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.store_refreshed(pg_catalog.uuid, pg_catalog.text, pg_catalog.text,'
        ' pg_catalog.text, pg_catalog.timestamptz, pg_catalog.text, pg_catalog.text, pg_catalog.bytea) TO %I', svc);

    -- Since 0005: the access token an upstream rejected, remembered for every worker and replica. The reads are
    -- get_oidc_link(s) plus the SHA-256 of a rejected access token of the link (NULL when none), which the broker
    -- compares with the token it decrypted, and (0008) the fingerprint of a recorded re-auth-required state;
    -- get_oidc_link(s) stay, unchanged, for replicas of older versions.
    REVOKE ALL ON token_broker.rejected_access FROM PUBLIC;
    GRANT SELECT, INSERT, UPDATE ON token_broker.rejected_access TO token_broker_elevated;
    GRANT CREATE ON SCHEMA token_broker TO token_broker_elevated;
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.read_oidc_link(p_user_id pg_catalog.uuid)
        RETURNS TABLE (access_token pg_catalog.text, refresh_token pg_catalog.text, expiry pg_catalog.timestamptz,
                       access_key_id pg_catalog.text, refresh_key_id pg_catalog.text,
                       account_disabled pg_catalog.bool, rejected_sha256 pg_catalog.bytea,
                       reauth_fingerprint pg_catalog.bytea)
        LANGUAGE plpgsql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET plan_cache_mode = force_generic_plan
        AS $body$ BEGIN
            RETURN QUERY
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s, r.access_sha256,
                   s.fingerprint
            FROM public.user_links l %s
            LEFT JOIN token_broker.rejected_access r ON r.user_id OPERATOR(pg_catalog.=) l.user_id
            LEFT JOIN token_broker.link_state s ON s.user_id OPERATOR(pg_catalog.=) l.user_id
            WHERE l.user_id OPERATOR(pg_catalog.=) p_user_id
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type;
        END $body$ $f$, account_expr, account_join);
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.read_oidc_links(p_user_ids pg_catalog.uuid[])
        RETURNS TABLE (user_id pg_catalog.uuid, access_token pg_catalog.text, refresh_token pg_catalog.text,
                       expiry pg_catalog.timestamptz, access_key_id pg_catalog.text,
                       refresh_key_id pg_catalog.text, account_disabled pg_catalog.bool,
                       rejected_sha256 pg_catalog.bytea, reauth_fingerprint pg_catalog.bytea)
        LANGUAGE plpgsql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        SET plan_cache_mode = force_generic_plan
        AS $body$ BEGIN
            RETURN QUERY
            SELECT l.user_id, l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s, r.access_sha256,
                   s.fingerprint
            FROM public.user_links l %s
            LEFT JOIN token_broker.rejected_access r ON r.user_id OPERATOR(pg_catalog.=) l.user_id
            LEFT JOIN token_broker.link_state s ON s.user_id OPERATOR(pg_catalog.=) l.user_id
            WHERE l.user_id OPERATOR(pg_catalog.=) ANY (p_user_ids)
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type;
        END $body$ $f$, account_expr, account_join);
    -- An upstream rejected the link's access token with this SHA-256 (of the plain token): committed on its own,
    -- before the forced refresh, so that it holds whether that refresh succeeds, fails or never ends.
    CREATE OR REPLACE FUNCTION token_broker.reject_access_token(p_user_id pg_catalog.uuid,
                                                                p_access_sha256 pg_catalog.bytea)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        INSERT INTO token_broker.rejected_access (user_id, access_sha256, rejected_at)
        VALUES (p_user_id, p_access_sha256, pg_catalog.clock_timestamp())
        ON CONFLICT (user_id) DO UPDATE
            SET access_sha256 = EXCLUDED.access_sha256, rejected_at = EXCLUDED.rejected_at
    $body$;
    ALTER FUNCTION token_broker.read_oidc_link(pg_catalog.uuid) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.read_oidc_links(pg_catalog.uuid[]) OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.reject_access_token(pg_catalog.uuid, pg_catalog.bytea) OWNER TO token_broker_elevated;
    REVOKE CREATE ON SCHEMA token_broker FROM token_broker_elevated;
    REVOKE ALL ON FUNCTION token_broker.read_oidc_link(pg_catalog.uuid) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.read_oidc_links(pg_catalog.uuid[]) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.reject_access_token(pg_catalog.uuid, pg_catalog.bytea) FROM PUBLIC;
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.read_oidc_link(pg_catalog.uuid) TO %I', svc);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION token_broker.read_oidc_links(pg_catalog.uuid[]) TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.reject_access_token(pg_catalog.uuid, pg_catalog.bytea) TO %I', svc);
END
$$;

-- Living beside the product's own refreshers (0006): which users are active, when their token is refreshed in the
-- background, and the refresh token a broker last wrote or saw (SHA-256 only). A separate block, so that what the
-- previous release calls above stays exactly as it was.
DO $$
DECLARE
    svc text := pg_catalog.current_setting('token_broker.service_role');
BEGIN
    REVOKE ALL ON token_broker.refresh_schedule FROM PUBLIC;
    GRANT SELECT, INSERT, UPDATE ON token_broker.refresh_schedule TO token_broker_elevated;
    GRANT CREATE ON SCHEMA token_broker TO token_broker_elevated;

    -- Links a broker read (p_seen: a caller asked; else the scheduler looked) or wrote, in one batch. For each: the
    -- background refresh is due at GREATEST(expiry - ahead, expiry - lifetime / 2), never before half the token's
    -- lifetime; a refresh token that is neither the last one recorded nor the one before (a stale read) is a
    -- rotation no broker made. Returns those, with whether it is the first for the user within p_log_after seconds.
    CREATE OR REPLACE FUNCTION token_broker.note_links(
        p_user_ids pg_catalog.uuid[], p_refresh_sha256 pg_catalog.bytea[], p_expiry pg_catalog.timestamptz[],
        p_ahead_seconds pg_catalog.float8[], p_lifetime_seconds pg_catalog.float8[], p_seen pg_catalog.bool,
        p_written pg_catalog.bool, p_log_after pg_catalog.float8)
    RETURNS TABLE (user_id pg_catalog.uuid, first_in_window pg_catalog.bool)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
    DECLARE
        n record;
        s token_broker.refresh_schedule%ROWTYPE;
        now_ pg_catalog.timestamptz := pg_catalog.clock_timestamp();
        lifetime pg_catalog.float8;
        due pg_catalog.timestamptz;
        foreign_ pg_catalog.bool;
    BEGIN
        FOR n IN
            SELECT * FROM ROWS FROM (pg_catalog.unnest(p_user_ids), pg_catalog.unnest(p_refresh_sha256),
                pg_catalog.unnest(p_expiry), pg_catalog.unnest(p_ahead_seconds), pg_catalog.unnest(p_lifetime_seconds))
                AS x(uid, sha, expiry, ahead, lifetime)
            ORDER BY 1
        LOOP
            SELECT * INTO s FROM token_broker.refresh_schedule r
            WHERE r.user_id OPERATOR(pg_catalog.=) n.uid FOR UPDATE;
            lifetime := COALESCE(n.lifetime, s.lifetime_seconds);
            due := NULL;
            IF n.expiry IS NOT NULL THEN
                due := n.expiry OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => n.ahead);
                IF lifetime IS NOT NULL THEN
                    due := GREATEST(due, n.expiry OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => lifetime OPERATOR(pg_catalog./) 2));
                END IF;
            END IF;
            IF s.user_id IS NULL THEN
                INSERT INTO token_broker.refresh_schedule (user_id, seen_at, due_at, lifetime_seconds, refresh_sha256)
                VALUES (n.uid, now_, due, lifetime, n.sha);
                CONTINUE;
            END IF;
            IF (n.sha OPERATOR(pg_catalog.=) s.previous_sha256) AND NOT p_written THEN
                -- A read from before a broker's write landed: nothing new about the token.
                UPDATE token_broker.refresh_schedule r
                SET seen_at = CASE WHEN p_seen THEN now_ ELSE r.seen_at END
                WHERE r.user_id OPERATOR(pg_catalog.=) n.uid;
                CONTINUE;
            END IF;
            foreign_ := NOT p_written AND s.refresh_sha256 IS NOT NULL
                AND (n.sha OPERATOR(pg_catalog.<>) s.refresh_sha256);
            UPDATE token_broker.refresh_schedule r
            SET seen_at = CASE WHEN p_seen THEN now_ ELSE r.seen_at END,
                due_at = due,
                claimed_until = CASE WHEN p_seen THEN r.claimed_until END,
                lifetime_seconds = lifetime,
                previous_sha256 = CASE WHEN n.sha OPERATOR(pg_catalog.=) r.refresh_sha256 THEN r.previous_sha256
                                       ELSE r.refresh_sha256 END,
                refresh_sha256 = n.sha,
                foreign_logged_at = CASE
                    WHEN foreign_ AND (r.foreign_logged_at IS NULL OR r.foreign_logged_at
                        OPERATOR(pg_catalog.<) (now_ OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => p_log_after)))
                    THEN now_ ELSE r.foreign_logged_at END
            WHERE r.user_id OPERATOR(pg_catalog.=) n.uid;
            IF foreign_ THEN
                user_id := n.uid;
                first_in_window := s.foreign_logged_at IS NULL OR s.foreign_logged_at
                    OPERATOR(pg_catalog.<) (now_ OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => p_log_after));
                RETURN NEXT;
            END IF;
        END LOOP;
    END $body$;

    -- The due background refreshes, each claimed by one replica for p_claim_seconds: an index range scan over the
    -- due rows only. A due user who has gone idle (no caller within p_active_seconds) is unscheduled instead.
    CREATE OR REPLACE FUNCTION token_broker.claim_due_refreshes(
        p_limit pg_catalog.int4, p_claim_seconds pg_catalog.float8, p_active_seconds pg_catalog.float8)
    RETURNS TABLE (user_id pg_catalog.uuid, refresh_sha256 pg_catalog.bytea)
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        WITH due AS (
            SELECT r.user_id,
                   r.seen_at OPERATOR(pg_catalog.>=) (pg_catalog.clock_timestamp()
                       OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => p_active_seconds)) AS active
            FROM token_broker.refresh_schedule r
            WHERE r.due_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()
              AND (r.claimed_until IS NULL OR r.claimed_until OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp())
            ORDER BY r.due_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE token_broker.refresh_schedule r
            SET claimed_until = CASE WHEN due.active THEN (pg_catalog.clock_timestamp()
                    OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => p_claim_seconds)) END,
                due_at = CASE WHEN due.active THEN r.due_at END
            FROM due
            WHERE r.user_id OPERATOR(pg_catalog.=) due.user_id
            RETURNING r.user_id, r.refresh_sha256, due.active
        )
        SELECT c.user_id, c.refresh_sha256 FROM claimed c WHERE c.active
    $body$;

    -- A background refresh that needs nothing more (the user went, the IdP refused): unscheduled until seen again.
    CREATE OR REPLACE FUNCTION token_broker.unschedule_refresh(p_user_id pg_catalog.uuid)
    RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        UPDATE token_broker.refresh_schedule SET due_at = NULL, claimed_until = NULL
        WHERE user_id OPERATOR(pg_catalog.=) p_user_id
    $body$;

    ALTER FUNCTION token_broker.note_links(pg_catalog.uuid[], pg_catalog.bytea[], pg_catalog.timestamptz[],
        pg_catalog.float8[], pg_catalog.float8[], pg_catalog.bool, pg_catalog.bool, pg_catalog.float8)
        OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.claim_due_refreshes(pg_catalog.int4, pg_catalog.float8, pg_catalog.float8)
        OWNER TO token_broker_elevated;
    ALTER FUNCTION token_broker.unschedule_refresh(pg_catalog.uuid) OWNER TO token_broker_elevated;
    REVOKE CREATE ON SCHEMA token_broker FROM token_broker_elevated;
    REVOKE ALL ON FUNCTION token_broker.note_links(pg_catalog.uuid[], pg_catalog.bytea[], pg_catalog.timestamptz[],
        pg_catalog.float8[], pg_catalog.float8[], pg_catalog.bool, pg_catalog.bool, pg_catalog.float8) FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.claim_due_refreshes(pg_catalog.int4, pg_catalog.float8, pg_catalog.float8)
        FROM PUBLIC;
    REVOKE ALL ON FUNCTION token_broker.unschedule_refresh(pg_catalog.uuid) FROM PUBLIC;
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.note_links(pg_catalog.uuid[], pg_catalog.bytea[],'
        ' pg_catalog.timestamptz[], pg_catalog.float8[], pg_catalog.float8[], pg_catalog.bool, pg_catalog.bool,'
        ' pg_catalog.float8) TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.claim_due_refreshes(pg_catalog.int4, pg_catalog.float8,'
        ' pg_catalog.float8) TO %I', svc);
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION token_broker.unschedule_refresh(pg_catalog.uuid) TO %I', svc);
END
$$;

-- Link events (0008): the recorded re-auth-required state, the outbox, and the webhook endpoint. Only reached
-- through the functions below; the functions above, which the previous release calls, stay as they are.
DO $$
DECLARE
    svc text := pg_catalog.current_setting('token_broker.service_role');
    has_users boolean := pg_catalog.to_regclass('public.users') IS NOT NULL;
    account_expr text := 'false';
    account_join text := '';
    fn text;
BEGIN
    IF has_users THEN
        account_expr := 'COALESCE(u.deleted OR u.status::pg_catalog.text OPERATOR(pg_catalog.=) ''suspended'', false)';
        account_join := 'LEFT JOIN public.users u ON u.id OPERATOR(pg_catalog.=) l.user_id';
    END IF;
    REVOKE ALL ON token_broker.link_state, token_broker.link_events, token_broker.link_events_pruned,
        token_broker.webhook_endpoint FROM PUBLIC;
    GRANT SELECT, INSERT, UPDATE, DELETE ON token_broker.link_state, token_broker.link_events,
        token_broker.link_events_pruned, token_broker.webhook_endpoint TO token_broker_elevated;
    GRANT CREATE ON SCHEMA token_broker TO token_broker_elevated;

    -- lock_oidc_link, plus the recorded state. The row lock is taken first and the row read by a second statement:
    -- a caller that waited for the lock then sees what its holder committed (marker, state), not the tables as they
    -- were when it started waiting.
    EXECUTE pg_catalog.format($f$
        CREATE OR REPLACE FUNCTION token_broker.lock_oidc_link_state(p_user_id pg_catalog.uuid)
        RETURNS TABLE (access_token pg_catalog.text, refresh_token pg_catalog.text, expiry pg_catalog.timestamptz,
                       access_key_id pg_catalog.text, refresh_key_id pg_catalog.text,
                       account_disabled pg_catalog.bool, marker_sha256 pg_catalog.bytea,
                       marker_idle_seconds pg_catalog.float8, forced_seconds_ago pg_catalog.float8,
                       reauth_fingerprint pg_catalog.bytea)
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $body$ BEGIN
            PERFORM 1 FROM public.user_links l
            WHERE l.user_id OPERATOR(pg_catalog.=) p_user_id
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type
            FOR UPDATE;
            RETURN QUERY
            SELECT l.oauth_access_token, l.oauth_refresh_token, l.oauth_expiry,
                   l.oauth_access_token_key_id, l.oauth_refresh_token_key_id, %s, f.refresh_sha256,
                   pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) f.heartbeat_at),
                   pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) fr.at),
                   s.fingerprint
            FROM public.user_links l %s
            LEFT JOIN token_broker.refresh_in_flight f ON f.user_id OPERATOR(pg_catalog.=) l.user_id
            LEFT JOIN token_broker.forced_refresh fr ON fr.user_id OPERATOR(pg_catalog.=) l.user_id
            LEFT JOIN token_broker.link_state s ON s.user_id OPERATOR(pg_catalog.=) l.user_id
            WHERE l.user_id OPERATOR(pg_catalog.=) p_user_id
              AND l.login_type OPERATOR(pg_catalog.=) 'oidc'::public.login_type;
        END $body$ $f$, account_expr, account_join);

    -- The link needs a new login: record the state and its event in the caller's transaction, once per change. An
    -- existing state for other tokens means the link changed (a new login) and died again unseen: that is a recovery
    -- and a new re-auth-required. Returns the new event's id, or NULL when the state was recorded already.
    CREATE OR REPLACE FUNCTION token_broker.note_reauth_required(
        p_user_id pg_catalog.uuid, p_fingerprint pg_catalog.bytea, p_error pg_catalog.text,
        p_forced pg_catalog.bool, p_webhook pg_catalog.bool)
    RETURNS pg_catalog.int8
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
    DECLARE
        v_old pg_catalog.bytea;
        v_id pg_catalog.int8;
        v_hook pg_catalog.text := CASE WHEN p_webhook THEN 'pending' ELSE 'none' END;
    BEGIN
        PERFORM pg_catalog.pg_advisory_xact_lock(7533738021829310565);  -- the event writers' order (0008)
        SELECT s.fingerprint INTO v_old FROM token_broker.link_state s
        WHERE s.user_id OPERATOR(pg_catalog.=) p_user_id FOR UPDATE;
        IF FOUND THEN
            IF v_old OPERATOR(pg_catalog.=) p_fingerprint THEN
                RETURN NULL;
            END IF;
            INSERT INTO token_broker.link_events (type, user_id, occurred_at, detail, webhook)
            VALUES ('link.recovered', p_user_id, pg_catalog.clock_timestamp(),
                    pg_catalog.jsonb_build_object('recovered_by', 'login'), v_hook);
            UPDATE token_broker.link_state SET fingerprint = p_fingerprint, error = p_error,
                since = pg_catalog.clock_timestamp()
            WHERE user_id OPERATOR(pg_catalog.=) p_user_id;
        ELSE
            INSERT INTO token_broker.link_state (user_id, fingerprint, error, since)
            VALUES (p_user_id, p_fingerprint, p_error, pg_catalog.clock_timestamp())
            ON CONFLICT (user_id) DO NOTHING;
            IF NOT FOUND THEN
                RETURN NULL;  -- recorded by a concurrent transaction, which emitted the event
            END IF;
        END IF;
        INSERT INTO token_broker.link_events (type, user_id, occurred_at, detail, webhook)
        VALUES ('link.reauth_required', p_user_id, pg_catalog.clock_timestamp(),
                pg_catalog.jsonb_build_object('error', p_error, 'forced', p_forced), v_hook)
        RETURNING id INTO v_id;
        RETURN v_id;
    END $body$;

    -- The link has working tokens again (its tokens are no longer those the state was recorded for): lift the state
    -- and emit the event, once, whoever sees it first. Returns the event's id, or NULL when another did.
    CREATE OR REPLACE FUNCTION token_broker.note_link_recovered(
        p_user_id pg_catalog.uuid, p_fingerprint pg_catalog.bytea, p_how pg_catalog.text, p_webhook pg_catalog.bool)
    RETURNS pg_catalog.int8
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
    DECLARE
        v_id pg_catalog.int8;
    BEGIN
        PERFORM pg_catalog.pg_advisory_xact_lock(7533738021829310565);  -- the event writers' order (0008)
        DELETE FROM token_broker.link_state
        WHERE user_id OPERATOR(pg_catalog.=) p_user_id AND fingerprint OPERATOR(pg_catalog.=) p_fingerprint;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        INSERT INTO token_broker.link_events (type, user_id, occurred_at, detail, webhook)
        VALUES ('link.recovered', p_user_id, pg_catalog.clock_timestamp(),
                pg_catalog.jsonb_build_object('recovered_by', p_how),
                CASE WHEN p_webhook THEN 'pending' ELSE 'none' END)
        RETURNING id INTO v_id;
        RETURN v_id;
    END $body$;

    -- This replica's webhook endpoint (SHA-256 of its URL): recorded; a new URL lifts a stop. Returns whether the
    -- endpoint is stopped (it answered 410).
    CREATE OR REPLACE FUNCTION token_broker.register_webhook_endpoint(p_url_sha256 pg_catalog.bytea)
    RETURNS pg_catalog.bool
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        INSERT INTO token_broker.webhook_endpoint AS w (one, url_sha256) VALUES (true, p_url_sha256)
        ON CONFLICT (one) DO UPDATE
            SET url_sha256 = EXCLUDED.url_sha256,
                stopped_at = CASE WHEN w.url_sha256 OPERATOR(pg_catalog.=) EXCLUDED.url_sha256
                             THEN w.stopped_at END
        RETURNING stopped_at IS NOT NULL
    $body$;

    -- The endpoint answered 410: stop it for every replica. True for the call that stopped it.
    CREATE OR REPLACE FUNCTION token_broker.stop_webhook_endpoint(p_url_sha256 pg_catalog.bytea)
    RETURNS pg_catalog.bool
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        WITH stopped AS (
            UPDATE token_broker.webhook_endpoint SET stopped_at = pg_catalog.clock_timestamp()
            WHERE url_sha256 OPERATOR(pg_catalog.=) p_url_sha256 AND stopped_at IS NULL
            RETURNING 1
        )
        SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM stopped
    $body$;

    -- Claim deliveries: only each user's oldest pending event, when due and not claimed by a live process (a claim
    -- lasts p_lease seconds; one left by a dead process is taken over when it lapses). Nothing while the endpoint is
    -- stopped.
    CREATE OR REPLACE FUNCTION token_broker.claim_link_events(
        p_claimer pg_catalog.text, p_limit pg_catalog.int4, p_lease pg_catalog.float8,
        p_url_sha256 pg_catalog.bytea)
    RETURNS TABLE (id pg_catalog.int8, type pg_catalog.text, user_id pg_catalog.uuid,
                   occurred_at pg_catalog.timestamptz, detail pg_catalog.jsonb, attempts pg_catalog.int4)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$ BEGIN
        IF EXISTS (SELECT 1 FROM token_broker.webhook_endpoint w
                   WHERE w.url_sha256 OPERATOR(pg_catalog.=) p_url_sha256 AND w.stopped_at IS NOT NULL) THEN
            RETURN;
        END IF;
        RETURN QUERY
        WITH heads AS (
            SELECT DISTINCT ON (e.user_id) e.id FROM token_broker.link_events e
            WHERE e.webhook OPERATOR(pg_catalog.=) 'pending'
            ORDER BY e.user_id, e.id
        ), ready AS (
            -- pending again here: a row delivered since `heads` was read is re-checked on its new version
            SELECT e.id FROM token_broker.link_events e JOIN heads h ON h.id OPERATOR(pg_catalog.=) e.id
            WHERE e.webhook OPERATOR(pg_catalog.=) 'pending'
              AND e.next_attempt_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp()
              AND (e.claimed_until IS NULL OR e.claimed_until OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp())
            ORDER BY e.id
            LIMIT p_limit
            FOR UPDATE OF e SKIP LOCKED
        )
        UPDATE token_broker.link_events e
        SET claimed_by = p_claimer,
            claimed_until = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)
                pg_catalog.make_interval(secs => p_lease),
            attempts = e.attempts OPERATOR(pg_catalog.+) 1
        FROM ready r
        WHERE e.id OPERATOR(pg_catalog.=) r.id AND e.webhook OPERATOR(pg_catalog.=) 'pending'
          AND (e.claimed_until IS NULL OR e.claimed_until OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp())
        RETURNING e.id, e.type, e.user_id, e.occurred_at, e.detail, e.attempts;
    END $body$;

    -- The outcome of a claimed delivery: delivered, failed (the retry period is over), or retry after p_delay
    -- seconds (also: give a claim back). Only the claimer's own claim counts.
    CREATE OR REPLACE FUNCTION token_broker.settle_link_event(
        p_id pg_catalog.int8, p_claimer pg_catalog.text, p_outcome pg_catalog.text, p_delay pg_catalog.float8)
    RETURNS pg_catalog.bool
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        WITH settled AS (
            UPDATE token_broker.link_events
            SET webhook = CASE WHEN p_outcome OPERATOR(pg_catalog.=) 'retry' THEN webhook ELSE p_outcome END,
                settled_at = CASE WHEN p_outcome OPERATOR(pg_catalog.=) 'retry' THEN NULL
                             ELSE pg_catalog.clock_timestamp() END,
                next_attempt_at = pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+)
                    pg_catalog.make_interval(secs => p_delay),
                claimed_by = NULL, claimed_until = NULL
            WHERE id OPERATOR(pg_catalog.=) p_id AND claimed_by OPERATOR(pg_catalog.=) p_claimer
              AND webhook OPERATOR(pg_catalog.=) 'pending'
              AND p_outcome OPERATOR(pg_catalog.=) ANY (ARRAY['delivered', 'failed', 'retry'])
            RETURNING 1
        )
        SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM settled
    $body$;

    -- The stream: events after the cursor (the last id seen), in id order, which is commit order (0008).
    CREATE OR REPLACE FUNCTION token_broker.read_link_events(p_after pg_catalog.int8, p_limit pg_catalog.int4)
    RETURNS TABLE (id pg_catalog.int8, type pg_catalog.text, user_id pg_catalog.uuid,
                   occurred_at pg_catalog.timestamptz, detail pg_catalog.jsonb)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        SELECT e.id, e.type, e.user_id, e.occurred_at, e.detail FROM token_broker.link_events e
        WHERE e.id OPERATOR(pg_catalog.>) p_after
        ORDER BY e.id
        LIMIT p_limit
    $body$;

    -- Where a watcher's cursor stands: (the latest id, or the last one pruned; the last id pruned, 0 if none).
    -- A cursor above the first is unknown; below the second, events after it may be gone.
    CREATE OR REPLACE FUNCTION token_broker.link_events_bounds()
    RETURNS TABLE (head pg_catalog.int8, pruned pg_catalog.int8)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        SELECT GREATEST((SELECT pg_catalog.max(e.id) FROM token_broker.link_events e), p.through, 0),
               COALESCE(p.through, 0)
        FROM (SELECT (SELECT x.through FROM token_broker.link_events_pruned x) AS through) p
    $body$;

    -- Retention: events older than p_seconds go, except those a webhook has still to deliver; the highest id gone
    -- is kept, so that a cursor from before it is told so.
    CREATE OR REPLACE FUNCTION token_broker.prune_link_events(p_seconds pg_catalog.float8)
    RETURNS pg_catalog.int8
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
    DECLARE
        v_count pg_catalog.int8;
        v_max pg_catalog.int8;
    BEGIN
        WITH gone AS (
            DELETE FROM token_broker.link_events
            WHERE occurred_at OPERATOR(pg_catalog.<)
                  (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => p_seconds))
              AND webhook OPERATOR(pg_catalog.<>) 'pending'
            RETURNING id
        )
        SELECT pg_catalog.count(*), pg_catalog.max(id) INTO v_count, v_max FROM gone;
        IF v_max IS NOT NULL THEN
            INSERT INTO token_broker.link_events_pruned AS p (one, through) VALUES (true, v_max)
            ON CONFLICT (one) DO UPDATE SET through = GREATEST(p.through, EXCLUDED.through);
        END IF;
        RETURN v_count;
    END $body$;

    -- Seconds since the oldest event still waiting for its webhook delivery occurred (0: none waits).
    CREATE OR REPLACE FUNCTION token_broker.link_events_backlog()
    RETURNS pg_catalog.float8
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $body$
        SELECT COALESCE(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
                        pg_catalog.min(e.occurred_at)), 0)
        FROM token_broker.link_events e WHERE e.webhook OPERATOR(pg_catalog.=) 'pending'
    $body$;

    FOREACH fn IN ARRAY ARRAY[
        'token_broker.read_oidc_link(pg_catalog.uuid)',
        'token_broker.read_oidc_links(pg_catalog.uuid[])',
        'token_broker.lock_oidc_link_state(pg_catalog.uuid)',
        'token_broker.note_reauth_required(pg_catalog.uuid, pg_catalog.bytea, pg_catalog.text, pg_catalog.bool,'
            ' pg_catalog.bool)',
        'token_broker.note_link_recovered(pg_catalog.uuid, pg_catalog.bytea, pg_catalog.text, pg_catalog.bool)',
        'token_broker.register_webhook_endpoint(pg_catalog.bytea)',
        'token_broker.stop_webhook_endpoint(pg_catalog.bytea)',
        'token_broker.claim_link_events(pg_catalog.text, pg_catalog.int4, pg_catalog.float8, pg_catalog.bytea)',
        'token_broker.settle_link_event(pg_catalog.int8, pg_catalog.text, pg_catalog.text, pg_catalog.float8)',
        'token_broker.read_link_events(pg_catalog.int8, pg_catalog.int4)',
        'token_broker.link_events_bounds()',
        'token_broker.prune_link_events(pg_catalog.float8)',
        'token_broker.link_events_backlog()'
    ] LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO token_broker_elevated', fn);
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', fn, svc);
    END LOOP;
    REVOKE CREATE ON SCHEMA token_broker FROM token_broker_elevated;
END
$$;
