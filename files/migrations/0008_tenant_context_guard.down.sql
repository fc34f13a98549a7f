-- =============================================================================
-- 0008_tenant_context_guard.down.sql: revert 0008
-- =============================================================================
-- Drops public.require_tenant_context(), app.set_community_context(uuid),
-- app.current_community_id() and the schema app (the runbook's order); the grants go with them. 0009-0011 must be
-- reverted first. The schema is dropped without CASCADE: if anything else lives
-- in `app` (or still uses these functions) the revert stops with 2BP01 rather
-- than destroying it. Schema `migrations` (the engine's records) is never
-- touched.
-- =============================================================================

DROP FUNCTION public.require_tenant_context();
DROP FUNCTION app.set_community_context(uuid);
DROP FUNCTION app.current_community_id();
DROP SCHEMA app;
