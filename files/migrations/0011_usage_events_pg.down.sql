-- =============================================================================
-- 0011_usage_events_pg.down.sql: revert 0011_usage_events_pg.sql
-- =============================================================================
-- Drops the three tables of 0011 in the runbook's order (newest dependency
-- first), then the trigger functions guard_reconciliation_fence() and
-- guard_jwks_key(). Indexes, constraints, triggers, policies and grants go
-- with the tables; prevent_mutation() belongs to 0009 and stays.
-- Strict on purpose (no IF EXISTS, no CASCADE): the engine runs this only for
-- an applied 0011, inside one transaction; a missing table (42P01) or an object
-- someone built on these tables (2BP01) stops the revert instead of being
-- dropped silently. Data in these tables is lost: take a backup first.
-- =============================================================================

DROP TABLE public.reconciliation_cursor;
DROP TABLE public.s2s_jwks_public_keys;
DROP TABLE public.usage_events;
DROP FUNCTION public.guard_reconciliation_fence();
DROP FUNCTION public.guard_jwks_key();
