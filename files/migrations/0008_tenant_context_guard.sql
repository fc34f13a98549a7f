-- =============================================================================
-- 0008_tenant_context_guard.sql: the tenant context of the ledger
-- =============================================================================
-- Creates schema `app` and the two functions every tenant-scoped statement of
-- the application relies on:
--   app.set_community_context(uuid)  sets the transaction-local setting
--                                    `app.community_id` (set_config(..., true):
--                                    it ends with the transaction, so it is safe
--                                    under PgBouncer transaction pooling);
--   app.current_community_id()       returns that tenant, or raises SQLSTATE
--                                    P0001 'app.community_id is not set' when it
--                                    is missing (NULL: never set in the session)
--                                    or empty ('': the value left behind once an
--                                    earlier transaction's local setting ended).
--   public.require_tenant_context()  statement trigger function: an INSERT by a
--                                    role held to row-level security raises that
--                                    P0001 without a context even when it inserts
--                                    no row (INSERT ... SELECT of nothing), so a
--                                    sweep that forgot its context fails loudly.
--
-- Guarantees: both functions pin search_path to `pg_catalog, pg_temp`, touch only
-- schema-qualified objects, are not executable by PUBLIC, and are executable by
-- arrakis_app (and the owner). None is SECURITY DEFINER. The trigger function
-- is executable by nobody but its owner (triggers do not need EXECUTE).
--
-- Requires: the roles arrakis_app and arrakis_admin (runbook pre-migration
-- checklist); the file stops with SQLSTATE 42704 and a hint when one is missing.
-- Objects are created with plain CREATE: an existing object fails the whole
-- file (42P06/42P07/42723) inside the engine's transaction, nothing half-applied.
--
-- Revert: 0008_tenant_context_guard.down.sql drops the three functions, then the
-- schema (without CASCADE: anything else found in `app` stops the revert).
-- =============================================================================

DO $roles$
DECLARE
    missing text;
BEGIN
    SELECT pg_catalog.string_agg(r.name, ', ' ORDER BY r.name)
      INTO missing
      FROM (VALUES ('arrakis_app'), ('arrakis_admin')) AS r (name)
     WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles AS p WHERE p.rolname = r.name);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'undefined_object',
            MESSAGE = pg_catalog.format('0008_tenant_context_guard: role(s) %s do not exist', missing),
            HINT = 'Create them first (runbook pre-migration checklist): arrakis_app LOGIN, arrakis_admin BYPASSRLS.';
    END IF;
END
$roles$;

CREATE SCHEMA app;

COMMENT ON SCHEMA app IS
    'Tenant context guard and ledger helper functions (migrations 0008, 0009).';

GRANT USAGE ON SCHEMA app TO arrakis_app;

CREATE FUNCTION app.current_community_id()
    RETURNS uuid
    LANGUAGE plpgsql
    STABLE
    PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    raw text := pg_catalog.current_setting('app.community_id', true);
BEGIN
    -- NULL: never set in this session; '': set by an earlier transaction whose
    -- local setting has ended. Both mean "no tenant", never a cast error.
    IF raw IS NULL OR raw = '' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = 'app.community_id is not set',
            HINT = 'Call app.set_community_context(<community uuid>) inside the transaction first.';
    END IF;
    RETURN raw::uuid;
END
$fn$;

COMMENT ON FUNCTION app.current_community_id() IS
    'The tenant of the current transaction (setting app.community_id); raises P0001 "app.community_id is not set" when missing or empty.';

CREATE FUNCTION app.set_community_context(p_community_id uuid)
    RETURNS void
    LANGUAGE plpgsql
    VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF p_community_id IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'app.set_community_context: the community id must not be NULL';
    END IF;
    -- is_local = true: the value lives until the end of the current transaction
    -- only, so a pooled server connection never carries it to another client.
    PERFORM pg_catalog.set_config('app.community_id', p_community_id::text, true);
END
$fn$;

COMMENT ON FUNCTION app.set_community_context(uuid) IS
    'Sets the tenant (app.community_id) for the current transaction only (SET LOCAL semantics).';

REVOKE ALL ON FUNCTION app.current_community_id() FROM PUBLIC;
REVOKE ALL ON FUNCTION app.set_community_context(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.current_community_id() TO arrakis_app;
GRANT EXECUTE ON FUNCTION app.set_community_context(uuid) TO arrakis_app;

CREATE FUNCTION public.require_tenant_context()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- Row-level security already raises P0001 for every row read, written or
    -- checked without a context; this covers the statement that touches no row.
    -- Roles that bypass RLS (superuser, arrakis_admin) are not tenants.
    IF pg_catalog.row_security_active(TG_RELID) THEN
        PERFORM app.current_community_id();
    END IF;
    RETURN NULL;
END
$fn$;

COMMENT ON FUNCTION public.require_tenant_context() IS
    'Statement trigger of the tenant tables: P0001 "app.community_id is not set" for a role held to RLS without a context, even when no row is touched.';

REVOKE ALL ON FUNCTION public.require_tenant_context() FROM PUBLIC;
