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
--   public.reconciliation_cursor   one cursor per tenant; tenant RLS.
--
-- Guarantees: amounts are bigint micro-USD (>= 0), token counts >= 0; RLS
-- enabled AND forced on usage_events and reconciliation_cursor with the same
-- policy as 0009 (USING: the transaction's tenant, no context = no rows; WITH
-- CHECK: app.current_community_id(), no context = P0001).
--
-- Grants. arrakis_app: usage_events SELECT, INSERT; s2s_jwks_public_keys
-- SELECT, INSERT (publishing keys; revocation is an operator's UPDATE);
-- reconciliation_cursor SELECT, INSERT and UPDATE of the cursor's progress
-- columns only (not community_id; no DELETE). arrakis_admin: SELECT.
--
-- Plain CREATE everywhere: an existing object fails the whole file (42P07 ...)
-- inside the engine's transaction, nothing half-applied.
--
-- Revert: 0011_usage_events_pg.down.sql drops reconciliation_cursor,
-- s2s_jwks_public_keys, usage_events (runbook order).
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
    CONSTRAINT usage_events_amount_micro_check CHECK (amount_micro >= 0)
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

CREATE TABLE public.reconciliation_cursor (
    community_id            uuid        NOT NULL,
    last_processed_event_id uuid,
    last_fence_token        bigint      NOT NULL DEFAULT 0,
    last_reconciled_at      timestamptz,
    drift_micro             bigint      NOT NULL DEFAULT 0,
    updated_at              timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT reconciliation_cursor_pkey PRIMARY KEY (community_id),
    CONSTRAINT reconciliation_cursor_last_fence_token_check CHECK (last_fence_token >= 0)
);

COMMENT ON TABLE public.reconciliation_cursor IS
    'Per-tenant reconciliation progress; advanced with a fence-token compare-and-set.';

ALTER TABLE public.usage_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.usage_events FORCE ROW LEVEL SECURITY;
ALTER TABLE public.reconciliation_cursor ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.reconciliation_cursor FORCE ROW LEVEL SECURITY;

CREATE POLICY usage_events_tenant_isolation ON public.usage_events
    FOR ALL
    USING (community_id = NULLIF(pg_catalog.current_setting('app.community_id', true), '')::uuid)
    WITH CHECK (community_id = app.current_community_id());

CREATE POLICY reconciliation_cursor_tenant_isolation ON public.reconciliation_cursor
    FOR ALL
    USING (community_id = NULLIF(pg_catalog.current_setting('app.community_id', true), '')::uuid)
    WITH CHECK (community_id = app.current_community_id());

GRANT SELECT, INSERT ON TABLE public.usage_events TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.s2s_jwks_public_keys TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.reconciliation_cursor TO arrakis_app;
GRANT UPDATE (last_processed_event_id, last_fence_token, last_reconciled_at, drift_micro, updated_at)
    ON TABLE public.reconciliation_cursor TO arrakis_app;
GRANT SELECT ON TABLE public.usage_events, public.s2s_jwks_public_keys, public.reconciliation_cursor
    TO arrakis_admin;
