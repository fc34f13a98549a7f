-- =============================================================================
-- 0009_credit_lots_lot_entries.down.sql: revert 0009
-- =============================================================================
-- Drops, in the runbook's order: the view lot_balances, credit_lot_balances,
-- lot_entries, credit_lots, the trigger functions apply_lot_entry(),
-- open_lot_balance(), prevent_mutation() and app.update_lot_status(uuid, text).
-- Indexes, constraints, triggers, policies and grants go with the tables.
-- 0010 and 0011 use prevent_mutation() and credit_lots: revert them first
-- (otherwise this stops with 2BP01, dependent objects still exist).
-- Strict on purpose (no IF EXISTS, no CASCADE): the engine runs this only for
-- an applied 0009, inside one transaction; nothing it did not create is
-- dropped. The ledger's data is lost: take a backup first.
-- =============================================================================

DROP VIEW public.lot_balances;
DROP TABLE public.credit_lot_balances;
DROP TABLE public.lot_entries;
DROP TABLE public.credit_lots;
DROP FUNCTION public.apply_lot_entry();
DROP FUNCTION public.open_lot_balance();
DROP FUNCTION public.prevent_mutation();
DROP FUNCTION app.update_lot_status(uuid, text);
