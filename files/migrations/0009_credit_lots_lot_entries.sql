-- =============================================================================
-- 0009_credit_lots_lot_entries.sql: the double-entry, append-only credit ledger
-- =============================================================================
-- Creates (tables and view in `public`, as the runbook's queries name them):
--   public.credit_lots             one row per lot of credit a tenant received
--   public.lot_entries             the journal: credit/debit/expiry/credit_back
--   public.credit_lot_balances     one balance row per lot, maintained by the
--                                  database from the journal (never by hand)
--   public.lot_balances            view: per-lot credited/debited/remaining
--   public.open_lot_balance()      trigger function (SECURITY DEFINER): a new
--                                  lot gets its balance row
--   public.apply_lot_entry()       trigger function (SECURITY DEFINER): an
--                                  entry moves its lot's balance, or is refused
--   public.prevent_mutation()      trigger function: UPDATE/DELETE/TRUNCATE
--                                  refused with SQLSTATE P0002 (also used by
--                                  0010 and 0011)
--   app.update_lot_status(uuid, text)
--                                  SECURITY DEFINER: the one permitted change of
--                                  a lot, status active -> expired|depleted
--
-- Guarantees:
--   * Money is bigint micro-USD, 1 .. 10^15 per lot or entry (USD 1e9), so no
--     balance or sum can overflow bigint; a payment_id can back at most one
--     lot (UNIQUE), so a replayed payment cannot mint twice.
--   * No lot is ever overdrawn or over-credited, whoever writes: each entry
--     updates its lot's balance row with a conditional UPDATE (debit/expiry:
--     remaining >= amount; credit: credits <= the lot's amount; credit_back:
--     <= what was debited), refused with 23514 naming the lot and amounts.
--     Racing writers serialise on that one row under READ COMMITTED; CHECKs
--     (0 <= remaining <= amount ...) are the backstop. The cost does not grow
--     with a lot's history (no SUM over the journal).
--   * Lock order, every path: the lot row (the application's FOR UPDATE, or
--     the foreign key's KEY SHARE), then its balance row. The balance trigger
--     is an AFTER trigger whose name sorts after the foreign key's
--     RI_ConstraintTrigger, so the key check always locks the lot first.
--   * Tenant isolation: RLS enabled AND forced (the owner is held to it too).
--     Policy <table>_tenant_isolation (every role without BYPASSRLS):
--       USING      app.current_community_id() IS NOT NULL AND community_id =
--                  app.current_community_id() (no context: P0001, raised by
--                  the planner's one-time filter even on an empty table: a
--                  forgotten context fails loudly instead of the runbook's
--                  "0 rows", which a sweep would take for "nothing to do");
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
--   * arrakis_app: SELECT, INSERT on the tables, SELECT on the view and the
--     balances, UPDATE (status) on credit_lots (only so that SELECT ... FOR
--     UPDATE OF credit_lots can lock lots: the trigger still refuses every
--     change but the transition), EXECUTE on app.update_lot_status; no
--     DELETE/TRUNCATE. Marking an already depleted or expired lot again is a
--     no-op. The balance rows change only from the journal trigger (a direct
--     INSERT/UPDATE/DELETE/TRUNCATE, even by the owner: P0002). arrakis_admin
--     (BYPASSRLS): SELECT only, for cross-tenant reads (expiry sweep, support).
--   * The SECURITY DEFINER function pins search_path to pg_catalog, pg_temp,
--     schema-qualifies what it touches, and is not executable by PUBLIC.
--
-- Plain CREATE everywhere: an existing object fails the whole file (42P07 ...)
-- inside the engine's transaction, nothing half-applied.
--
-- Revert: 0009_credit_lots_lot_entries.down.sql drops the view, the balances,
-- lot_entries, credit_lots, the trigger functions and app.update_lot_status,
-- in that order (the runbook's rollback section; 0010 and 0011 must be reverted first).
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
    -- credit_lot_balances passes 'balance': written only by the journal trigger.
    IF TG_NARGS > 0 AND TG_ARGV[0] = 'balance' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('%I.%I is maintained from lot_entries: a direct %s is refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP),
            HINT = 'Insert a credit, debit, expiry or credit_back entry into public.lot_entries instead.';
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
    -- At most 10^15 micro-USD (USD 1e9) a lot: no balance can overflow bigint.
    CONSTRAINT credit_lots_amount_micro_check CHECK (amount_micro > 0 AND amount_micro <= 1000000000000000),
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
    CONSTRAINT lot_entries_amount_micro_check CHECK (amount_micro > 0 AND amount_micro <= 1000000000000000)
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

-- The balance of each lot, maintained by apply_lot_entry() from the journal:
-- reading or guarding a balance costs one row, however long the lot's history.
CREATE TABLE public.credit_lot_balances (
    lot_id            uuid   NOT NULL,
    community_id      uuid   NOT NULL,
    amount_micro      bigint NOT NULL,
    credit_micro      bigint NOT NULL DEFAULT 0,
    credit_back_micro bigint NOT NULL DEFAULT 0,
    debited_micro     bigint NOT NULL DEFAULT 0,
    remaining_micro   bigint GENERATED ALWAYS AS (credit_micro + credit_back_micro - debited_micro) STORED,
    CONSTRAINT credit_lot_balances_pkey PRIMARY KEY (lot_id),
    CONSTRAINT credit_lot_balances_lot_id_community_id_fkey
        FOREIGN KEY (lot_id, community_id) REFERENCES public.credit_lots (id, community_id),
    -- Credits never exceed the lot's amount.
    CONSTRAINT credit_lot_balances_credit_micro_check CHECK (credit_micro BETWEEN 0 AND amount_micro),
    -- A credit_back never returns more than was debited.
    CONSTRAINT credit_lot_balances_credit_back_micro_check CHECK (credit_back_micro BETWEEN 0 AND debited_micro),
    -- 2^62: debits and credit_backs can cycle; their totals stay far from overflow.
    CONSTRAINT credit_lot_balances_debited_micro_check CHECK (debited_micro BETWEEN 0 AND 4611686018427387904),
    -- Never overdrawn, never over-credited.
    CONSTRAINT credit_lot_balances_remaining_micro_check CHECK (remaining_micro BETWEEN 0 AND amount_micro)
);

COMMENT ON TABLE public.credit_lot_balances IS
    'Per-lot balance (micro-USD) maintained from lot_entries by apply_lot_entry(); 0 <= remaining <= amount; changed only by the journal trigger.';

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
       b.credit_micro + b.credit_back_micro AS credited_micro,
       b.debited_micro,
       b.remaining_micro
  FROM public.credit_lots AS l
  JOIN public.credit_lot_balances AS b
    ON b.lot_id = l.id
   AND b.community_id = l.community_id;

COMMENT ON VIEW public.lot_balances IS
    'Per-lot balance (micro-USD): credited = credit + credit_back, debited = debit + expiry. security_invoker: the caller''s RLS applies.';

CREATE FUNCTION public.open_lot_balance()
    RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    INSERT INTO public.credit_lot_balances (lot_id, community_id, amount_micro)
    VALUES (NEW.id, NEW.community_id, NEW.amount_micro);
    RETURN NULL;
END
$fn$;

COMMENT ON FUNCTION public.open_lot_balance() IS
    'AFTER INSERT on credit_lots: the lot''s balance row (nothing credited yet).';

REVOKE ALL ON FUNCTION public.open_lot_balance() FROM PUBLIC;

CREATE FUNCTION public.apply_lot_entry()
    RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    b public.credit_lot_balances;
BEGIN
    -- One conditional UPDATE of the lot's balance row. A racing writer waits for
    -- the row, then READ COMMITTED re-checks the condition on the new version.
    IF NEW.entry_type IN ('debit', 'expiry') THEN
        UPDATE public.credit_lot_balances
           SET debited_micro = debited_micro + NEW.amount_micro
         WHERE lot_id = NEW.lot_id
           AND remaining_micro >= NEW.amount_micro;
    ELSIF NEW.entry_type = 'credit' THEN
        UPDATE public.credit_lot_balances
           SET credit_micro = credit_micro + NEW.amount_micro
         WHERE lot_id = NEW.lot_id
           AND credit_micro <= amount_micro - NEW.amount_micro;
    ELSE  -- credit_back
        UPDATE public.credit_lot_balances
           SET credit_back_micro = credit_back_micro + NEW.amount_micro
         WHERE lot_id = NEW.lot_id
           AND credit_back_micro <= debited_micro - NEW.amount_micro
           AND remaining_micro <= amount_micro - NEW.amount_micro;
    END IF;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO b FROM public.credit_lot_balances WHERE lot_id = NEW.lot_id;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        CONSTRAINT = 'credit_lot_balances_remaining_micro_check',
        MESSAGE = pg_catalog.format('credit lot %s: %s of %s micro refused: %s', NEW.lot_id, NEW.entry_type,
                                    NEW.amount_micro,
                                    CASE WHEN b.lot_id IS NULL THEN 'the lot has no balance row'
                                         WHEN NEW.entry_type IN ('debit', 'expiry')
                                         THEN pg_catalog.format('only %s remaining', b.remaining_micro)
                                         WHEN NEW.entry_type = 'credit'
                                         THEN pg_catalog.format('credits would exceed the lot''s amount %s (already credited %s)',
                                                                b.amount_micro, b.credit_micro)
                                         ELSE pg_catalog.format('credit_backs would exceed what was debited %s (already credited back %s) or the lot''s amount %s (remaining %s)',
                                                                b.debited_micro, b.credit_back_micro, b.amount_micro, b.remaining_micro)
                                    END),
        HINT = 'A lot is never overdrawn or over-credited: debit at most its remaining balance (lot_balances.remaining_micro, read under SELECT ... FOR UPDATE OF credit_lots).';
END
$fn$;

COMMENT ON FUNCTION public.apply_lot_entry() IS
    'AFTER INSERT on lot_entries: moves the lot''s balance row, or refuses the entry (23514) when it would overdraw or over-credit the lot.';

REVOKE ALL ON FUNCTION public.apply_lot_entry() FROM PUBLIC;

-- Named after the foreign key's RI_ConstraintTrigger_* (AFTER triggers fire in
-- name order): the key check locks the lot row first, then this the balance.
CREATE TRIGGER credit_lots_open_balance
    AFTER INSERT ON public.credit_lots
    FOR EACH ROW EXECUTE FUNCTION public.open_lot_balance();

CREATE TRIGGER lot_entries_apply_balance
    AFTER INSERT ON public.lot_entries
    FOR EACH ROW EXECUTE FUNCTION public.apply_lot_entry();

-- Only the two functions above write balances (they run one trigger level
-- down); a direct write, the owner's included, is refused.
CREATE TRIGGER credit_lot_balances_no_insert
    BEFORE INSERT ON public.credit_lot_balances
    FOR EACH ROW WHEN (pg_catalog.pg_trigger_depth() < 1) EXECUTE FUNCTION public.prevent_mutation('balance');

CREATE TRIGGER credit_lot_balances_no_update
    BEFORE UPDATE ON public.credit_lot_balances
    FOR EACH ROW WHEN (pg_catalog.pg_trigger_depth() < 1) EXECUTE FUNCTION public.prevent_mutation('balance');

CREATE TRIGGER credit_lot_balances_no_delete
    BEFORE DELETE ON public.credit_lot_balances
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation('balance');

CREATE TRIGGER credit_lot_balances_no_truncate
    BEFORE TRUNCATE ON public.credit_lot_balances
    FOR EACH STATEMENT EXECUTE FUNCTION public.prevent_mutation('balance');

-- Without a context, an INSERT raises P0001 even when it inserts nothing. The WHEN
-- clause keeps the function call off the path of every INSERT that has a context.
CREATE TRIGGER credit_lots_requires_context
    BEFORE INSERT ON public.credit_lots
    FOR EACH STATEMENT
    WHEN (NULLIF(pg_catalog.current_setting('app.community_id', true), '') IS NULL)
    EXECUTE FUNCTION public.require_tenant_context();

CREATE TRIGGER lot_entries_requires_context
    BEFORE INSERT ON public.lot_entries
    FOR EACH STATEMENT
    WHEN (NULLIF(pg_catalog.current_setting('app.community_id', true), '') IS NULL)
    EXECUTE FUNCTION public.require_tenant_context();

ALTER TABLE public.credit_lots ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.credit_lots FORCE ROW LEVEL SECURITY;
ALTER TABLE public.lot_entries ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.lot_entries FORCE ROW LEVEL SECURITY;
ALTER TABLE public.credit_lot_balances ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.credit_lot_balances FORCE ROW LEVEL SECURITY;

-- app.current_community_id() IS NOT NULL has no column: the planner makes it a
-- one-time filter, evaluated once per scan even on an empty table, so reading
-- without a context raises P0001. community_id = ... is an index condition.

CREATE POLICY credit_lots_tenant_isolation ON public.credit_lots
    FOR ALL
    USING (app.current_community_id() IS NOT NULL AND community_id = app.current_community_id())
    WITH CHECK (community_id = app.current_community_id());

CREATE POLICY lot_entries_tenant_isolation ON public.lot_entries
    FOR ALL
    USING (app.current_community_id() IS NOT NULL AND community_id = app.current_community_id())
    WITH CHECK (community_id = app.current_community_id());

CREATE POLICY credit_lot_balances_tenant_isolation ON public.credit_lot_balances
    FOR ALL
    USING (app.current_community_id() IS NOT NULL AND community_id = app.current_community_id())
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
    v_status text;
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
       AND community_id = v_community
       AND status = 'active';
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    PERFORM pg_catalog.set_config('app.lot_status_transition', '', true);
    IF v_rows = 0 THEN
        -- Already depleted or expired (by this caller earlier, or by a racing
        -- sweep): a final status stays, and marking it again is a no-op.
        SELECT l.status INTO v_status
          FROM public.credit_lots AS l
         WHERE l.id = p_lot_id
           AND l.community_id = v_community;
        IF v_status IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = 'no_data_found',
                MESSAGE = pg_catalog.format('app.update_lot_status: credit lot %s not found in community %s', p_lot_id, v_community);
        END IF;
    END IF;
END
$fn$;

COMMENT ON FUNCTION app.update_lot_status(uuid, text) IS
    'The only way to change a lot: status active -> expired|depleted, within the current tenant context; a lot already depleted or expired stays so (no-op). Row lock only.';

REVOKE ALL ON FUNCTION app.update_lot_status(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.update_lot_status(uuid, text) TO arrakis_app;

GRANT SELECT, INSERT ON TABLE public.credit_lots TO arrakis_app;
-- Row locks (SELECT ... FOR UPDATE OF credit_lots) need an UPDATE privilege on
-- some column; status is the one column that may change, and only through
-- app.update_lot_status (credit_lots_no_update refuses a direct UPDATE).
GRANT UPDATE (status) ON TABLE public.credit_lots TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.lot_entries TO arrakis_app;
GRANT SELECT ON TABLE public.credit_lot_balances, public.lot_balances TO arrakis_app;
GRANT SELECT ON TABLE public.credit_lots, public.lot_entries, public.credit_lot_balances, public.lot_balances
    TO arrakis_admin;
