-- =============================================================================
-- 0010_webhook_events_crypto_payments.sql: webhook dedup and crypto payments
-- =============================================================================
-- Creates (in `public`):
--   public.webhook_events      every provider callback once: UNIQUE (provider,
--                              event_id) makes INSERT ... ON CONFLICT (provider,
--                              event_id) DO NOTHING the dedup; append-only
--                              (prevent_mutation() from 0009, P0002).
--   public.crypto_payments     one row per payment at the provider (payment_id
--                              UNIQUE), tenant-scoped with forced RLS.
--   public.enforce_payment_status_monotonicity()
--                              trigger function: status ranks in the order
--                              waiting(0) confirming(1) confirmed(2) sending(3)
--                              partially_paid(4) finished(5) expired(6)
--                              failed(7) refunded(8); a status may only move to
--                              a higher rank, after finished only to refunded,
--                              and expired, failed, refunded are final (else
--                              SQLSTATE 23514). The trigger maintains
--                              status_rank and updated_at (= created_at on
--                              INSERT, now() on UPDATE, whatever the writer
--                              sent); payment_id goes from NULL (the row exists
--                              before the provider assigns one) to a value
--                              once; the identity of a payment (id,
--                              community_id, provider, amount_usd, currency,
--                              created_at) never changes and the mint fields
--                              are written once (P0002). For every writer, the
--                              owner included.
--
-- webhook_events has no tenant column (the callback is deduplicated before its
-- tenant is known): it is global, guarded by privileges rather than RLS.
--
-- Grants. arrakis_app: webhook_events SELECT, INSERT (dedup needs no more);
-- crypto_payments SELECT, INSERT and UPDATE of the columns a payment's life
-- changes (payment_id once, status, amount_crypto, checkout_url,
-- credits_minted_at, credits_mint_lot_id, metadata, and updated_at, which the
-- application writes itself and the trigger overrides), never of the rest of
-- its identity or status_rank, and no DELETE/TRUNCATE. arrakis_admin: SELECT
-- (the stuck-payment sweep across tenants).
--
-- Plain CREATE everywhere: an existing object fails the whole file (42P07 ...)
-- inside the engine's transaction, nothing half-applied.
--
-- Revert: 0010_webhook_events_crypto_payments.down.sql drops crypto_payments,
-- webhook_events, then enforce_payment_status_monotonicity() (runbook order).
-- =============================================================================

CREATE TABLE public.webhook_events (
    id           uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    provider     text        NOT NULL,
    event_id     text        NOT NULL,
    payload      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    processed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT webhook_events_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_events_provider_event_id_key UNIQUE (provider, event_id),
    CONSTRAINT webhook_events_provider_check CHECK (provider IN ('nowpayments', 'x402'))
);

COMMENT ON TABLE public.webhook_events IS
    'Provider callbacks, once each: INSERT ... ON CONFLICT (provider, event_id) DO NOTHING; append-only.';

CREATE TRIGGER webhook_events_no_update
    BEFORE UPDATE ON public.webhook_events
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER webhook_events_no_delete
    BEFORE DELETE ON public.webhook_events
    FOR EACH ROW EXECUTE FUNCTION public.prevent_mutation();

CREATE TRIGGER webhook_events_no_truncate
    BEFORE TRUNCATE ON public.webhook_events
    FOR EACH STATEMENT EXECUTE FUNCTION public.prevent_mutation();

CREATE FUNCTION public.enforce_payment_status_monotonicity()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_rank integer := CASE NEW.status
                          WHEN 'waiting' THEN 0
                          WHEN 'confirming' THEN 1
                          WHEN 'confirmed' THEN 2
                          WHEN 'sending' THEN 3
                          WHEN 'partially_paid' THEN 4
                          WHEN 'finished' THEN 5
                          WHEN 'expired' THEN 6
                          WHEN 'failed' THEN 7
                          WHEN 'refunded' THEN 8
                      END;
BEGIN
    IF v_rank IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = pg_catalog.format('crypto_payments: unknown status %L', NEW.status);
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.status_rank := v_rank;
        NEW.updated_at := NEW.created_at;
        RETURN NEW;
    END IF;
    IF (NEW.id, NEW.community_id, NEW.provider, NEW.amount_usd, NEW.currency, NEW.created_at)
       IS DISTINCT FROM
       (OLD.id, OLD.community_id, OLD.provider, OLD.amount_usd, OLD.currency, OLD.created_at)
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('crypto_payments %s: the identity of a payment (id, community_id, provider, amount_usd, currency, created_at) cannot change', OLD.id);
    END IF;
    -- The provider's id arrives after the row exists: NULL -> a value, once.
    IF OLD.payment_id IS NOT NULL AND NEW.payment_id IS DISTINCT FROM OLD.payment_id THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('crypto_payments %s: payment_id is already %s; it is set once and never changes',
                                        OLD.id, OLD.payment_id);
    END IF;
    IF OLD.credits_minted_at IS NOT NULL
       AND (NEW.credits_minted_at, NEW.credits_mint_lot_id) IS DISTINCT FROM (OLD.credits_minted_at, OLD.credits_mint_lot_id)
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0002',
            MESSAGE = pg_catalog.format('crypto_payments %s: credits were already minted (lot %s); the mint fields are written once', OLD.payment_id, OLD.credits_mint_lot_id);
    END IF;
    -- Forward only; after finished only refunded; expired, failed, refunded
    -- are final. OLD.status (not the writable status_rank) is the truth.
    IF NEW.status <> OLD.status
       AND (OLD.status IN ('expired', 'failed', 'refunded')
            OR (OLD.status = 'finished' AND NEW.status <> 'refunded')
            OR v_rank < OLD.status_rank)
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = pg_catalog.format('crypto_payments %s: status cannot move from %s (rank %s) to %s (rank %s)',
                                        COALESCE(OLD.payment_id, OLD.id::text), OLD.status, OLD.status_rank, NEW.status, v_rank),
            HINT = 'A status only moves forward, after finished only to refunded, and expired, failed, refunded are final; treat a late callback as already applied (UPDATE ... WHERE status_rank < <new rank>).';
    END IF;
    NEW.status_rank := v_rank;
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$fn$;

COMMENT ON FUNCTION public.enforce_payment_status_monotonicity() IS
    'crypto_payments: status only moves forward, finished only to refunded, expired/failed/refunded final (23514); maintains status_rank and updated_at; payment_id NULL -> value once, identity immutable, mint fields write-once (P0002).';

REVOKE ALL ON FUNCTION public.enforce_payment_status_monotonicity() FROM PUBLIC;

CREATE TABLE public.crypto_payments (
    id                  uuid          NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    community_id        uuid          NOT NULL,
    -- NULL until the provider assigns it; then set once (the trigger).
    payment_id          text,
    provider            text          NOT NULL DEFAULT 'nowpayments',
    amount_usd          numeric(12,2) NOT NULL,
    amount_crypto       numeric(24,8),
    currency            text          NOT NULL DEFAULT 'USDT',
    status              text          NOT NULL DEFAULT 'waiting',
    -- 0..8, maintained by the trigger; integer is the application's contract.
    -- squawk-ignore prefer-bigint-over-int
    status_rank         integer       NOT NULL DEFAULT 0,
    checkout_url        text,
    credits_minted_at   timestamptz,
    credits_mint_lot_id uuid,
    metadata            jsonb         NOT NULL DEFAULT '{}'::jsonb,
    created_at          timestamptz   NOT NULL DEFAULT pg_catalog.now(),
    updated_at          timestamptz   NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT crypto_payments_pkey PRIMARY KEY (id),
    CONSTRAINT crypto_payments_payment_id_key UNIQUE (payment_id),
    -- The minted lot belongs to the payment's tenant.
    CONSTRAINT crypto_payments_credits_mint_lot_fkey
        FOREIGN KEY (credits_mint_lot_id, community_id) REFERENCES public.credit_lots (id, community_id),
    CONSTRAINT crypto_payments_provider_check CHECK (provider IN ('nowpayments', 'x402')),
    CONSTRAINT crypto_payments_amount_usd_check CHECK (amount_usd > 0),
    CONSTRAINT crypto_payments_amount_crypto_check CHECK (amount_crypto >= 0),
    CONSTRAINT crypto_payments_status_check CHECK (status IN (
        'waiting', 'confirming', 'confirmed', 'sending', 'partially_paid',
        'finished', 'expired', 'failed', 'refunded')),
    CONSTRAINT crypto_payments_status_rank_check CHECK (status_rank BETWEEN 0 AND 8),
    CONSTRAINT crypto_payments_mint_fields_check
        CHECK ((credits_minted_at IS NULL) = (credits_mint_lot_id IS NULL))
);

COMMENT ON TABLE public.crypto_payments IS
    'Crypto payments at the provider; payment_id set once; status moves forward only (enforce_payment_status_monotonicity).';

-- Stuck payments: a status whose updated_at is old.
CREATE INDEX crypto_payments_status_updated_at_idx
    ON public.crypto_payments (status, updated_at);

-- A tenant's payments by time.
CREATE INDEX crypto_payments_community_id_created_at_idx
    ON public.crypto_payments (community_id, created_at);

CREATE TRIGGER crypto_payments_status_monotonicity
    BEFORE INSERT OR UPDATE ON public.crypto_payments
    FOR EACH ROW EXECUTE FUNCTION public.enforce_payment_status_monotonicity();

CREATE TRIGGER crypto_payments_requires_context
    BEFORE INSERT ON public.crypto_payments
    FOR EACH STATEMENT
    WHEN (NULLIF(pg_catalog.current_setting('app.community_id', true), '') IS NULL)
    EXECUTE FUNCTION public.require_tenant_context();

ALTER TABLE public.crypto_payments ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.crypto_payments FORCE ROW LEVEL SECURITY;

CREATE POLICY crypto_payments_tenant_isolation ON public.crypto_payments
    FOR ALL
    USING (app.current_community_id() IS NOT NULL AND community_id = app.current_community_id())
    WITH CHECK (community_id = app.current_community_id());

GRANT SELECT, INSERT ON TABLE public.webhook_events TO arrakis_app;
GRANT SELECT, INSERT ON TABLE public.crypto_payments TO arrakis_app;
GRANT UPDATE (payment_id, status, amount_crypto, checkout_url, credits_minted_at, credits_mint_lot_id, metadata,
              updated_at)
    ON TABLE public.crypto_payments TO arrakis_app;
GRANT SELECT ON TABLE public.webhook_events, public.crypto_payments TO arrakis_admin;
