-- =============================================================================
-- 0009_credit_lots_lot_entries.sql: the double-entry, append-only credit ledger
-- =============================================================================
-- Creates (tables and view in `public`, as the runbook's queries name them):
--   public.credit_lots             one row per lot of credit a tenant received
--   public.lot_entries             the journal: credit/debit/expiry/credit_back
--   public.lot_balances            view: per-lot credited/debited/remaining
--   public.prevent_mutation()      trigger function: UPDATE/DELETE/TRUNCATE
--                                  refused with SQLSTATE P0002 (also used by
--                                  0010 and 0011)
--   app.update_lot_status(uuid, text)
--                                  SECURITY DEFINER: the one permitted change of
--                                  a lot, status active -> expired|depleted
--
-- Guarantees:
--   * Money is bigint micro-USD, strictly positive; a payment_id can back at
--     most one lot (UNIQUE), so a replayed payment cannot mint twice.
--   * Tenant isolation: RLS enabled AND forced (the owner is held to it too).
--     Policy <table>_tenant_isolation (every role without BYPASSRLS):
--       USING      community_id = the transaction's app.community_id
--                  (no context: the setting is NULL or '', so no row matches;
--                  the runbook's "0 rows without context");
--       WITH CHECK community_id = app.current_community_id()
--                  (no context: P0001 'app.community_id is not set').
--   * An entry and its lot always share the tenant: composite foreign key
--     (lot_id, community_id) -> credit_lots (id, community_id).
--   * Append-only: BEFORE UPDATE / BEFORE DELETE row triggers and a BEFORE
--     TRUNCATE statement trigger raise P0002 for every role, superuser included.
--     The only exception is credit_lots_no_update letting through an UPDATE
--     that changes nothing but status from active to expired|depleted while
--     app.update_lot_status() has flagged that lot for the current transaction.
--     That path takes only the row lock and the ROW EXCLUSIVE table lock an
--     INSERT takes too: no DDL, no trigger disabling, inserts never wait.
--   * lot_balances is security_invoker: it runs with the caller's rights, so
--     the caller's RLS applies (a view owned by the migration user would show
--     every tenant's rows).
--   * arrakis_app: SELECT, INSERT on the tables, SELECT on the view, EXECUTE on
--     app.update_lot_status; no UPDATE/DELETE/TRUNCATE. arrakis_admin
--     (BYPASSRLS): SELECT only, for cross-tenant reads (expiry sweep, support).
--   * The SECURITY DEFINER function pins search_path to pg_catalog, pg_temp,
--     schema-qualifies what it touches, and is not executable by PUBLIC.
--
-- Plain CREATE everywhere: an existing object fails the whole file (42P07 ...)
-- inside the engine's transaction, nothing half-applied.
--
-- Revert: 0009_credit_lots_lot_entries.down.sql drops the view, lot_entries,
-- credit_lots, prevent_mutation() and app.update_lot_status(uuid, text), in that
-- order (the runbook's rollback section; 0010 and 0011 must be reverted first).
-- =============================================================================

CREATE FUNCTION public.prevent_mutation()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    -- credit_lots_no_update passes 'lot_status_transition': the one change a
    -- lot may undergo, and only when app.update_lot_status() asked for it.
    IF TG_OP = 'UPDATE' AND TG_NARGS > 0 AND TG_ARGV[0] = 'lot_status_transition' THEN
        IF OLD.status = 'active'
           AND NEW.status IN ('expired', 'depleted')
           AND (pg_catalog.to_jsonb(NEW) - 'status') = (pg_catalog.to_jsonb(OLD) - 'status')
           AND pg_catalog.current_setting('app.lot_status_transition', true) = OLD.id::text
        THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('%I.%I is append-only: UPDATE refused', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            DETAIL = pg_catalog.format('lot %s: status %s -> %s%s; the only permitted change is status active -> expired|depleted through app.update_lot_status()',
                                       OLD.id, OLD.status, NEW.status,
                                       CASE WHEN (pg_catalog.to_jsonb(NEW) - 'status') = (pg_catalog.to_jsonb(OLD) - 'status')
                                            THEN '' ELSE ', and other columns changed' END),
            HINT = 'Use SELECT app.update_lot_status(<lot id>, ''expired'' | ''depleted'') inside the tenant''s transaction.';
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'P0002',
        MESSAGE = pg_catalog.format('%I.%I is append-only: %s refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP),
        HINT = 'History is immutable: record a compensating row (e.g. a credit_back entry) instead.';
END
$fn$;

COMMENT ON FUNCTION public.prevent_mutation() IS
    'Append-only guard: raises P0002 on UPDATE, DELETE and TRUNCATE (argument lot_status_transition: lets app.update_lot_status() through).';

REVOKE ALL ON FUNCTION public.prevent_mutation() FROM PUBLIC;

CREATE TABLE public.credit_lots (
    id           uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    community_id uuid        NOT NULL,
    source       text        NOT NULL,
    payment_id   text,
    amount_micro bigint      NOT NULL,
    status       text        NOT NULL DEFAULT 'active',
    expires_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT credit_lots_pkey PRIMARY KEY (id),
    -- Target of lot_entries' composite foreign key (entry and lot share the tenant).
    CONSTRAINT credit_lots_id_community_id_key UNIQUE (id, community_id),
    -- NULLs are distinct: lots without a payment (grant, seed, ...) are not limited.
    CONSTRAINT credit_lots_payment_id_key UNIQUE (payment_id),
    CONSTRAINT credit_lots_source_check
        CHECK (source IN ('purchase', 'grant', 'seed', 'x402', 'transfer_in', 'tba_deposit')),
    CONSTRAINT credit_lots_amount_micro_check CHECK (amount_micro > 0),
    CONSTRAINT credit_lots_status_check CHECK (status IN ('active', 'expired', 'depleted'))
);

COMMENT ON TABLE public.credit_lots IS
    'Credit lots (micro-USD); append-only except status active -> expired|depleted via app.update_lot_status().';

-- A tenant's lots by time.
CREATE INDEX credit_lots_community_id_created_at_idx
    ON public.credit_lots (community_id, created_at);

-- The expiry sweep: active lots with an expiry, oldest first.
CREATE INDEX credit_lots_expiry_sweep_idx
    ON public.credit_lots (expires_at)
    WHERE status = 'active' AND expires_at IS NOT NULL;

CREATE TABLE public.lot_entries (
    id             uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    lot_id         uuid        NOT NULL,
    community_id   uuid        NOT NULL,
    entry_type     text        NOT NULL,
    amount_micro   bigint      NOT NULL,
    reservation_id text,
    usage_event_id text,
    reference_id   text,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT lot_entries_pkey PRIMARY KEY (id),
    CONSTRAINT lot_entries_lot_id_community_id_fkey
        FOREIGN KEY (lot_id, community_id) REFERENCES public.credit_lots (id, community_id),
    CONSTRAINT lot_entries_entry_type_check
        CHECK (entry_type IN ('credit', 'debit', 'expiry', 'credit_back')),
    CONSTRAINT lot_entries_amount_micro_check CHECK (amount_micro > 0)
);

COMMENT ON TABLE public.lot_entries IS
    'Append-only journal of credit lots (micro-USD); an entry and its lot always share the tenant.';

-- One lot's balance (lot_balances); covering, so an all-visible append-only
-- table answers it with an index-only scan. Also serves the foreign key.
CREATE INDEX lot_entries_lot_id_idx
    ON public.lot_entries (lot_id, community_id) INCLUDE (entry_type, amount_micro);

-- Idempotent debits: one debit per (lot, reservation).
CREATE UNIQUE INDEX lot_entries_one_debit_per_reservation
    ON public.lot_entries (lot_id, reservation_id)
    WHERE entry_type = 'debit';

-- A tenant's journal by time.
CREATE INDEX lot_entries_community_id_created_at_idx
    ON public.lot_entries (community_id, created_at);

CREATE VIEW public.lot_balances
    WITH (security_invoker = true)
AS
SELECT l.id            AS lot_id,
       l.community_id,
       l.source,
       l.amount_micro  AS original_micro,
       l.status,
       l.expires_at,
       l.created_at,
       b.credited_micro,
       b.debited_micro,
       b.credited_micro - b.debited_micro AS remaining_micro
  FROM public.credit_lots AS l
 CROSS JOIN LATERAL (
        SELECT COALESCE(pg_catalog.sum(e.amount_micro) FILTER (WHERE e.entry_type IN ('credit', 'credit_back')), 0)::bigint
                   AS credited_micro,
               COALESCE(pg_catalog.sum(e.amount_micro) FILTER (WHERE e.entry_type IN ('debit', 'expiry')), 0)::bigint
                   AS debited_micro
          FROM public.lot_entries AS e
         WHERE e.lot_id = l.id
           AND e.community_id = l.community_id
       ) AS b;

COMMENT ON VIEW public.lot_balances IS
    'Per-lot balance (micro-USD): credited = credit + credit_back, debited = debit + expiry. security_invoker: the caller''s RLS applies.';

ALTER TABLE public.credit_lots ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.credit_lots FORCE ROW LEVEL SECURITY;
ALTER TABLE public.lot_entries ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.lot_entries FORCE ROW LEVEL SECURITY;

CREATE POLICY credit_lots_tenant_isolation ON public.credit_lots
    FOR ALL
    USING (community_id = NULLIF(pg_catalog.current_setting('app.community_id', true), '')::uuid)
    WITH CHECK (community_id = app.current_community_id());

CREATE POLICY lot_entries_tenant_isolation ON public.lot_entries
    FOR ALL
    USING (community_id = NULLIF(pg_catalog.current_setting('app.community_id', true), '')::uuid)
    WITH CHECK (community_id = app.current_community_id());

CREATE TRIGGER credit_lots_no_update
    BEFORE UPDATE ON public.credit_lots
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation('lot_status_transition');

CREATE TRIGGER credit_lots_no_delete
    BEFORE DELETE ON public.credit_lots
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER credit_lots_no_truncate
    BEFORE TRUNCATE ON public.credit_lots
    FOR EACH STATEMENT EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER lot_entries_no_update
    BEFORE UPDATE ON public.lot_entries
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER lot_entries_no_delete
    BEFORE DELETE ON public.lot_entries
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER lot_entries_no_truncate
    BEFORE TRUNCATE ON public.lot_entries
    FOR EACH STATEMENT EXECUTE FUNCTION public.prevent_mutation();

CREATE FUNCTION app.update_lot_status(p_lot_id uuid, p_status text)
    RETURNS void
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_community uuid := app.current_community_id();  -- P0001 without a tenant context
    v_rows bigint;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('expired', 'depleted') THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = pg_catalog.format('app.update_lot_status: status %L is not a permitted target', p_status),
            HINT = 'The only transitions are active -> expired and active -> depleted.';
    END IF;
    -- Transaction-local flag read by credit_lots_no_update; the trigger still
    -- checks that only status changes, from active to p_status.
    PERFORM pg_catalog.set_config('app.lot_status_transition', p_lot_id::text, true);
    UPDATE public.credit_lots
       SET status = p_status
     WHERE id = p_lot_id
       AND community_id = v_community;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    PERFORM pg_catalog.set_config('app.lot_status_transition', '', true);
    IF v_rows = 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'no_data_found',
            MESSAGE = pg_catalog.format('app.update_lot_status: credit lot %s not found in community %s', p_lot_id, v_community);
    END IF;
END
$fn$;

COMMENT ON FUNCTION app.update_lot_status(uuid, text) IS
    'The only way to change a lot: status active -> expired|depleted, within the current tenant context. Row lock only.';

REVOKE ALL ON FUNCTION app.update_lot_status(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.update_lot_status(uuid, text) TO arrakis_app;

GRANT SELECT, INSERT ON TABLE public.credit_lots TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.lot_entries TO arrakis_app;
GRANT SELECT ON TABLE public.lot_balances TO arrakis_app;
GRANT SELECT ON TABLE public.credit_lots, public.lot_entries, public.lot_balances TO arrakis_admin;
