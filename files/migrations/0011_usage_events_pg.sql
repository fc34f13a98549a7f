-- =============================================================================
-- 0011_usage_events_pg.sql: usage events, S2S JWKS keys, reconciliation cursor
-- =============================================================================
-- Creates (in `public`):
--   public.usage_events            metered usage, one row per finalized event
--                                  (finalization_id UNIQUE: a finalization is
--                                  recorded once); append-only (P0002, through
--                                  prevent_mutation() from 0009); tenant RLS.
--   public.s2s_jwks_public_keys    EC P-256 public keys of the freeside/finn
--                                  issuers; global (no tenant column), guarded
--                                  by privileges. Index serving "active keys of
--                                  an issuer" (not revoked, not expired).
--   public.reconciliation_cursor   one cursor per tenant, kept by the
--                                  reconciler: a service, not a tenant, so no
--                                  RLS (it reads and upserts any community's
--                                  cursor without a tenant context).
--   public.guard_jwks_key()        trigger function: a key's material and
--                                  issuer never change; revoked_at is set once
--                                  (a second revoke keeps the first time) and
--                                  never cleared (P0002).
--   public.guard_reconciliation_fence()
--                                  trigger function: the fence token never
--                                  moves back, whatever the UPDATE (23514), and
--                                  a cursor never changes community (P0002).
--
-- Guarantees: amounts are bigint micro-USD, 0 .. 10^15 (no sum overflows),
-- token counts >= 0; RLS enabled AND forced on usage_events with the policy of
-- 0009 (no context: P0001 for every read and write). The triggers hold for
-- every writer, the owner included.
--
-- Grants. arrakis_app: usage_events SELECT, INSERT; s2s_jwks_public_keys
-- SELECT, INSERT, UPDATE (revoked_at); reconciliation_cursor SELECT, INSERT and
-- UPDATE of the cursor's progress columns only (not community_id; no DELETE).
-- arrakis_admin: SELECT.
--
-- Plain CREATE everywhere: an existing object fails the whole file (42P07 ...)
-- inside the engine's transaction, nothing half-applied.
--
-- Revert: 0011_usage_events_pg.down.sql drops reconciliation_cursor,
-- s2s_jwks_public_keys, usage_events (runbook order), then the two trigger
-- functions.
-- =============================================================================

CREATE TABLE public.usage_events (
    event_id                      uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    community_id                  uuid        NOT NULL,
    nft_id                        text,
    pool_id                       text,
    -- integer is the application's contract for token counts (a single event is
    -- far below 2^31 tokens); amounts of money are bigint.
    -- squawk-ignore prefer-bigint-over-int
    tokens_input                  integer     NOT NULL DEFAULT 0,
    -- squawk-ignore prefer-bigint-over-int
    tokens_output                 integer     NOT NULL DEFAULT 0,
    amount_micro                  bigint      NOT NULL DEFAULT 0,
    reservation_id                text,
    finalization_id               text,
    fence_token                   bigint,
    conservation_guard_result     boolean,
    conservation_guard_violations jsonb,
    created_at                    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT usage_events_pkey PRIMARY KEY (event_id),
    CONSTRAINT usage_events_finalization_id_key UNIQUE (finalization_id),
    CONSTRAINT usage_events_tokens_input_check CHECK (tokens_input >= 0),
    CONSTRAINT usage_events_tokens_output_check CHECK (tokens_output >= 0),
    CONSTRAINT usage_events_amount_micro_check CHECK (amount_micro >= 0 AND amount_micro <= 1000000000000000)
);

COMMENT ON TABLE public.usage_events IS
    'Metered usage (micro-USD), append-only; finalization_id recorded once.';

-- Usage of a tenant by time.
CREATE INDEX usage_events_community_id_created_at_idx
    ON public.usage_events (community_id, created_at);

CREATE TRIGGER usage_events_no_update
    BEFORE UPDATE ON public.usage_events
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER usage_events_no_delete
    BEFORE DELETE ON public.usage_events
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER usage_events_no_truncate
    BEFORE TRUNCATE ON public.usage_events
    FOR EACH STATEMENT EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER usage_events_requires_context
    BEFORE INSERT ON public.usage_events
    FOR EACH STATEMENT
    WHEN (NULLIF(pg_catalog.current_setting('app.community_id', true), '') IS NULL)
    EXECUTE FUNCTION public.require_tenant_context();

CREATE FUNCTION public.guard_jwks_key()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF (NEW.kid, NEW.kty, NEW.crv, NEW.x, NEW.y, NEW.issuer, NEW.created_at)
       IS DISTINCT FROM (OLD.kid, OLD.kty, OLD.crv, OLD.x, OLD.y, OLD.issuer, OLD.created_at)
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('s2s_jwks_public_keys %s: a key''s material and issuer never change', OLD.kid),
            HINT = 'Publish a new key (a new kid) and revoke this one.';
    END IF;
    IF OLD.revoked_at IS NOT NULL THEN
        IF NEW.revoked_at IS NULL THEN
            RAISE EXCEPTION USING
                ERRCODE = 'P0002',
                MESSAGE = pg_catalog.format('s2s_jwks_public_keys %s: revoked at %s; a revocation is never cleared', OLD.kid, OLD.revoked_at);
        END IF;
        -- Revoking a revoked key again is a no-op: the first time stays.
        NEW.revoked_at := OLD.revoked_at;
    END IF;
    RETURN NEW;
END
$fn$;

COMMENT ON FUNCTION public.guard_jwks_key() IS
    's2s_jwks_public_keys: material (kid, kty, crv, x, y), issuer and created_at never change; revoked_at set once, never cleared (P0002).';

REVOKE ALL ON FUNCTION public.guard_jwks_key() FROM PUBLIC;

CREATE TABLE public.s2s_jwks_public_keys (
    kid        text        NOT NULL,
    kty        text        NOT NULL DEFAULT 'EC',
    crv        text        NOT NULL DEFAULT 'P-256',
    x          text        NOT NULL,
    y          text        NOT NULL,
    issuer     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at timestamptz,
    revoked_at timestamptz,
    CONSTRAINT s2s_jwks_public_keys_pkey PRIMARY KEY (kid),
    CONSTRAINT s2s_jwks_public_keys_kty_check CHECK (kty = 'EC'),
    CONSTRAINT s2s_jwks_public_keys_crv_check CHECK (crv = 'P-256'),
    CONSTRAINT s2s_jwks_public_keys_issuer_check CHECK (issuer IN ('freeside', 'finn'))
);

COMMENT ON TABLE public.s2s_jwks_public_keys IS
    'Service-to-service JWKS public keys (EC P-256) per issuer; active = revoked_at IS NULL and not expired.';

-- The active keys of an issuer: WHERE issuer = $1 AND revoked_at IS NULL
-- AND (expires_at IS NULL OR expires_at > now()).
CREATE INDEX s2s_jwks_public_keys_active_idx
    ON public.s2s_jwks_public_keys (issuer, expires_at)
    WHERE revoked_at IS NULL;

CREATE TRIGGER s2s_jwks_public_keys_guard
    BEFORE UPDATE ON public.s2s_jwks_public_keys
    FOR EACH ROW EXECUTE FUNCTION public.guard_jwks_key();

CREATE TABLE public.reconciliation_cursor (
    community_id            uuid        NOT NULL,
    last_processed_event_id uuid,
    last_fence_token        bigint      NOT NULL DEFAULT 0,
    last_reconciled_at      timestamptz,
    drift_micro             bigint      NOT NULL DEFAULT 0,
    updated_at              timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT reconciliation_cursor_pkey PRIMARY KEY (community_id),
    CONSTRAINT reconciliation_cursor_last_fence_token_check CHECK (last_fence_token >= 0),
    CONSTRAINT reconciliation_cursor_drift_micro_check
        CHECK (drift_micro BETWEEN -1000000000000000 AND 1000000000000000)
);

COMMENT ON TABLE public.reconciliation_cursor IS
    'Per-tenant reconciliation progress, kept by the reconciler service (no RLS); the fence token never moves back.';

CREATE FUNCTION public.guard_reconciliation_fence()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NEW.community_id IS DISTINCT FROM OLD.community_id THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('reconciliation_cursor %s: a cursor never changes community', OLD.community_id);
    END IF;
    IF NEW.last_fence_token < OLD.last_fence_token THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = pg_catalog.format('reconciliation_cursor %s: fence token cannot move back from %s to %s',
                                        OLD.community_id, OLD.last_fence_token, NEW.last_fence_token),
            HINT = 'A stale worker must change nothing: UPDATE ... WHERE community_id = $1 AND last_fence_token < $2.';
    END IF;
    RETURN NEW;
END
$fn$;

COMMENT ON FUNCTION public.guard_reconciliation_fence() IS
    'reconciliation_cursor: the fence token never moves back (23514), the community never changes (P0002).';

REVOKE ALL ON FUNCTION public.guard_reconciliation_fence() FROM PUBLIC;

CREATE TRIGGER reconciliation_cursor_fence
    BEFORE UPDATE ON public.reconciliation_cursor
    FOR EACH ROW EXECUTE FUNCTION public.guard_reconciliation_fence();

ALTER TABLE public.usage_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.usage_events FORCE ROW LEVEL SECURITY;

CREATE POLICY usage_events_tenant_isolation ON public.usage_events
    FOR ALL
    USING (app.current_community_id() IS NOT NULL AND community_id = app.current_community_id())
    WITH CHECK (community_id = app.current_community_id());

GRANT SELECT, INSERT ON TABLE public.usage_events TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.s2s_jwks_public_keys TO arrakis_app;
-- Revoking its own key; guard_jwks_key() keeps it set once.
GRANT UPDATE (revoked_at) ON TABLE public.s2s_jwks_public_keys TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.reconciliation_cursor TO arrakis_app;
GRANT UPDATE (last_processed_event_id, last_fence_token, last_reconciled_at, drift_micro, updated_at)
    ON TABLE public.reconciliation_cursor TO arrakis_app;
GRANT SELECT ON TABLE public.usage_events, public.s2s_jwks_public_keys, public.reconciliation_cursor
    TO arrakis_admin;
