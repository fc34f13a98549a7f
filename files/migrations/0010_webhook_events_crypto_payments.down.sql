-- =============================================================================
-- 0010_webhook_events_crypto_payments.down.sql: revert 0010
-- =============================================================================
-- Drops crypto_payments, webhook_events, then the trigger function
-- enforce_payment_status_monotonicity() (the runbook's order). Indexes,
-- constraints (including crypto_payments' foreign key to credit_lots),
-- triggers, policies and grants go with the tables.
-- Strict on purpose (no IF EXISTS, no CASCADE): the engine runs this only for
-- an applied 0010, inside one transaction; a missing object (42P01/42883) or
-- an object someone built on these (2BP01) stops the revert instead of being
-- dropped silently. Data in these tables is lost: take a backup first.
-- =============================================================================

DROP TABLE public.crypto_payments;
DROP TABLE public.webhook_events;
DROP FUNCTION public.enforce_payment_status_monotonicity();
