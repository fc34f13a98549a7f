"""ledger_verify on a real PostgreSQL 15: the happy path, the traces it must not leave, the
versions it must (not) check, and the damage it must name.

The module runs in-process (its AnsibleModule reads patched arguments), against copies of
the session's ledger template (0008-0011 applied with plain psycopg2, no history).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import uuid
from pathlib import Path

import psycopg2
import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_probes import leftover_rows
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    Expectations, jwks_kid, webhook_event_ids)
from conftest import apply_sql_files

ROOT = Path(__file__).resolve().parents[2]
ledger_verify = importlib.import_module("ansible_collections.arrakis.ledger.plugins.modules.ledger_verify")
ledger_common = importlib.import_module("ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common")

LEDGER_TABLES = ["credit_lots", "lot_entries", "webhook_events", "crypto_payments", "usage_events",
                 "s2s_jwks_public_keys", "reconciliation_cursor"]


def run_verify(url: str, check_mode: bool = False, **args) -> dict:
    """Run the module once; return its JSON result (failed or not)."""
    params = dict(database_url=url, limit="testenv", **args)
    if check_mode:
        params["_ansible_check_mode"] = True
    out = io.StringIO()
    with patch_module_args(params), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit):
            ledger_verify.main()
    return json.loads(out.getvalue())


def by_id(result: dict) -> dict:
    return {c["id"]: c for c in result["checks"]}


def execute(url: str, *statements: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for stmt in statements:
                cur.execute(stmt)
    finally:
        conn.close()


def scalar(url: str, query: str, params=None):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


def census(url: str) -> dict:
    """Every row of every ledger table (as the superuser: RLS bypassed) and the catalog's size."""
    out = {}
    for table in LEDGER_TABLES:
        out[table] = scalar(url, f"SELECT count(*) FROM public.{table}")
    out["pg_class"] = scalar(url, "SELECT count(*) FROM pg_class")
    out["pg_proc"] = scalar(url, "SELECT count(*) FROM pg_proc")
    out["pg_trigger"] = scalar(url, "SELECT count(*) FROM pg_trigger")
    out["pg_policy"] = scalar(url, "SELECT count(*) FROM pg_policy")
    return out


SEED = """
BEGIN;
SELECT app.set_community_context('11111111-1111-1111-1111-111111111111');
INSERT INTO public.credit_lots (id, community_id, source, payment_id, amount_micro)
VALUES ('aaaaaaaa-0000-0000-0000-000000000001', '11111111-1111-1111-1111-111111111111', 'purchase', 'real-pay-1', 5000000);
INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)
VALUES ('aaaaaaaa-0000-0000-0000-000000000001', '11111111-1111-1111-1111-111111111111', 'credit', 5000000);
INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd) VALUES ('11111111-1111-1111-1111-111111111111', 'real-pay-1', 5.00);
INSERT INTO public.usage_events (community_id, amount_micro, finalization_id) VALUES ('11111111-1111-1111-1111-111111111111', 10, 'real-fin-1');
INSERT INTO public.reconciliation_cursor (community_id) VALUES ('11111111-1111-1111-1111-111111111111');
INSERT INTO public.webhook_events (provider, event_id) VALUES ('x402', 'real-evt-1');
INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer) VALUES ('real-kid-1', 'x', 'y', 'finn');
COMMIT;
"""


@pytest.fixture(scope="module")
def seeded_db(pg_cluster, ledger_template):
    """One database shared by the read-only tests: verify leaves it as it found it (asserted).

    With the pipeline's records (migrations.history, events, lock), as a database the pipeline
    migrated has them: verify's first event would otherwise create them, and whichever test ran
    first (any test, under pytest-xdist) would see the catalog grow."""
    name = pg_cluster.create_db(template=ledger_template)
    url = pg_cluster.url(name)
    execute(url, SEED)
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            ledger_common.ensure_records(cur)
    finally:
        conn.close()
    try:
        yield url
    finally:
        pg_cluster.drop_db(name)


# --------------------------------------------------------------------------- happy path

EXPECTED_CHECKS = [
    "structure.view_security_invoker:public.lot_balances",
    "structure.rls_forced:public.credit_lots",
    "structure.rls_forced:public.credit_lot_balances",
    "structure.append_only_triggers:public.webhook_events",
    "structure.monotonicity_trigger:public.crypto_payments",
    "structure.app_privileges:public.usage_events",
    "structure.function_search_path:app.update_lot_status(uuid,text)",
    "structure.function_no_public_execute:app.update_lot_status(uuid,text)",
    "runbook.credit_lots_relrowsecurity:public.credit_lots",
    "runbook.crypto_payments_triggers:public.crypto_payments",
    "runbook.usage_events_triggers:public.usage_events",
    "runbook.guard_raises_p0001:app.current_community_id()",
    "runbook.insert_without_context_refused:public.credit_lots",
    "runbook.lot_balances_queryable:public.lot_balances",
    "runbook.select_without_context_raises:public.credit_lots",
    "behaviour.tenant_isolation:public.lot_balances",
    "behaviour.no_context_raises:public.usage_events",
    "behaviour.no_context_raises:public.lot_balances",
    "behaviour.cross_tenant_insert_refused:public.usage_events",
    "behaviour.entry_lot_same_tenant:public.lot_entries",
    "behaviour.update_refused_p0002:public.usage_events",
    "behaviour.delete_refused_p0002:public.webhook_events",
    "behaviour.lot_balances_values:public.lot_balances",
    "behaviour.lot_status_transition:app.update_lot_status(uuid,text)",
    "behaviour.payment_status_monotonic:public.crypto_payments",
    "behaviour.webhook_dedup:public.webhook_events",
    "behaviour.jwks_keys_readable:public.s2s_jwks_public_keys",
    "behaviour.reconciliation_cursor_advanced:public.reconciliation_cursor",
    "behaviour.lot_never_overdrawn:public.lot_entries",
    "behaviour.balance_matches_journal:public.credit_lot_balances",
    "behaviour.balance_written_by_journal_only:public.credit_lot_balances",
    "behaviour.debit_path_locks_lots:public.credit_lots",
    "behaviour.amounts_bounded:public.credit_lots",
    "behaviour.payment_final_and_id_once:public.crypto_payments",
    "behaviour.fence_never_moves_back:public.reconciliation_cursor",
    "behaviour.key_revoked_once:public.s2s_jwks_public_keys",
    "cleanup.no_rows_left",
    "cleanup.no_settings_left",
    "cleanup.no_objects_left",
]


def test_happy_path_passes_every_check(seeded_db):
    result = run_verify(seeded_db)
    assert not result.get("failed"), result["msg"]
    assert result["verification_failed"] is False
    assert result["changed"] is False
    assert result["versions"] == ["0008", "0009", "0010", "0011"]
    assert result["versions_source"] == "objects"
    checks = by_id(result)
    missing = [cid for cid in EXPECTED_CHECKS if cid not in checks]
    assert not missing
    assert all(c["status"] == "passed" for c in result["checks"]), result["failed_checks"]
    assert result["passed"] == len(result["checks"]) > 130
    # The known sequence of entries, through the view, as the application role.
    assert "10000000/10500000/5000000/5500000" in checks["behaviour.lot_balances_values:public.lot_balances"]["observed"]
    assert "P0002" in checks["behaviour.update_refused_p0002:public.credit_lots"]["observed"]
    assert "verify passed" in result["msg"]


def test_leaves_no_rows_settings_or_objects_and_records_one_event(seeded_db):
    before = census(seeded_db)
    events_before = (scalar(seeded_db, "SELECT count(*) FROM migrations.events")
                     if scalar(seeded_db, "SELECT to_regclass('migrations.events') IS NOT NULL") else 0)
    run_id = "test-" + uuid.uuid4().hex[:8]
    result = run_verify(seeded_db, run_id=run_id)
    assert not result.get("failed"), result["msg"]
    after = census(seeded_db)
    assert after == before
    assert before["credit_lots"] == 1  # the seeded real row is there, verify's are gone
    assert result["leftover_rows"] == {}
    assert "no row of verify's 2 tenant(s) or keys in credit_lots" in by_id(result)["cleanup.no_rows_left"]["observed"]
    assert result["event_logged"] is True
    rows = []
    conn = psycopg2.connect(seeded_db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT action, outcome, detail FROM migrations.events WHERE run_id = %s", (run_id,))
            rows = cur.fetchall()
            cur.execute("SELECT count(*) FROM migrations.events")
            events_after = cur.fetchone()[0]
    finally:
        conn.close()
    assert [(r[0], r[1]) for r in rows] == [("verify", "passed")]
    assert rows[0][2]["failed"] == [] and rows[0][2]["passed"] == result["passed"]
    assert events_after == events_before + 1


def test_check_mode_writes_nothing(seeded_db):
    run_verify(seeded_db)  # records exist from here on
    before = census(seeded_db)
    events = scalar(seeded_db, "SELECT count(*) FROM migrations.events")
    result = run_verify(seeded_db, check_mode=True)
    assert not result.get("failed"), result["msg"]
    assert result["event_logged"] is False
    assert scalar(seeded_db, "SELECT count(*) FROM migrations.events") == events
    assert census(seeded_db) == before


def test_no_session_left_in_a_transaction(seeded_db):
    run_verify(seeded_db)
    dbname = seeded_db.rsplit("/", 1)[1]
    assert scalar(seeded_db, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
                             " AND application_name = 'ledger-migrations'", (dbname,)) == 0
    assert scalar(seeded_db, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                             " WHERE a.datname = %s AND a.pid <> pg_backend_pid()", (dbname,)) == 0


# --------------------------------------------------------------------------- what is applied

def _history(url: str, versions: list[str]) -> None:
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import ensure_records

    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            ensure_records(cur)
            for v in versions:
                cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
                            " VALUES (%s, %s, %s, 'test', 1, 'test')", (v, "m" + v, "0" * 64))
    finally:
        conn.close()


def test_after_rollback_to_0009_only_0008_and_0009_are_checked(empty_db):
    apply_sql_files(empty_db, up_to="0009")
    _history(empty_db, ["0008", "0009"])
    result = run_verify(empty_db)
    assert not result.get("failed"), result["msg"]
    assert result["versions"] == ["0008", "0009"] and result["versions_source"] == "history"
    checks = by_id(result)
    assert checks["structure.not_applied_absent:version 0010"]["status"] == "passed"
    assert checks["structure.not_applied_absent:version 0011"]["status"] == "passed"
    touched = {c["relation"] for c in result["checks"] if c["group"] in ("structure", "behaviour", "runbook")}
    for rel in ("public.crypto_payments", "public.webhook_events", "public.usage_events",
                "public.s2s_jwks_public_keys", "public.reconciliation_cursor"):
        assert rel not in touched
    assert "behaviour.lot_balances_values:public.lot_balances" in checks
    assert "behaviour.webhook_dedup:public.webhook_events" not in checks

    # An object of an unapplied migration left behind is drift, and is named.
    execute(empty_db, "CREATE TABLE public.crypto_payments (id uuid)")
    result = run_verify(empty_db)
    assert result["failed"]
    assert result["failed_checks"] == ["structure.not_applied_absent:version 0010"], result["msg"]
    assert "public.crypto_payments" in result["msg"]


def test_nothing_applied_nothing_to_verify(empty_db):
    result = run_verify(empty_db)
    assert not result.get("failed"), result["msg"]
    assert result["versions"] == []
    assert not [c for c in result["checks"] if c["group"] in ("structure", "behaviour", "runbook")]
    assert "nothing to verify" in result["msg"]


def test_unreachable_target_is_a_clear_failure(pg_cluster):
    result = run_verify(pg_cluster.url("no_such_db_" + uuid.uuid4().hex[:6]))
    assert result["failed"] and result["verification_failed"]
    assert "cannot connect to postgres@127.0.0.1" in result["msg"]
    assert "Next:" in result["msg"] and "Traceback" not in result["msg"]


def test_password_never_in_the_result(pg_cluster, seeded_db):
    url = seeded_db.replace("postgres@", "postgres:s3cr3t-pw@")
    result = run_verify(url, pgbouncer_url="postgresql://postgres:s3cr3t-pw@127.0.0.1:1/x")
    assert "s3cr3t-pw" not in json.dumps(result)


# --------------------------------------------------------------------------- damage

VIEW_WITHOUT_INVOKER = """
DO $$
DECLARE def text := pg_get_viewdef('public.lot_balances'::regclass);
BEGIN
  EXECUTE 'DROP VIEW public.lot_balances';
  EXECUTE 'CREATE VIEW public.lot_balances AS ' || def;
  EXECUTE 'GRANT SELECT ON public.lot_balances TO arrakis_app';
END $$;
"""

DAMAGE = {
    "append_only_trigger_dropped": (
        ["DROP TRIGGER credit_lots_no_delete ON public.credit_lots"],
        ["structure.append_only_triggers:public.credit_lots", "behaviour.delete_refused_p0002:public.credit_lots"],
        ["public.credit_lots", "DELETE not guarded (no trigger)"],
    ),
    "append_only_trigger_disabled": (
        ["ALTER TABLE public.usage_events DISABLE TRIGGER usage_events_no_update"],
        ["structure.append_only_triggers:public.usage_events", "runbook.usage_events_triggers:public.usage_events",
         "behaviour.update_refused_p0002:public.usage_events"],
        ["public.usage_events", "usage_events_no_update is disabled"],
    ),
    "rls_disabled": (
        ["ALTER TABLE public.crypto_payments DISABLE ROW LEVEL SECURITY"],
        ["structure.rls_enabled:public.crypto_payments", "behaviour.tenant_isolation:public.crypto_payments",
         "behaviour.cross_tenant_insert_refused:public.crypto_payments"],
        ["public.crypto_payments", "relrowsecurity = False"],
    ),
    "rls_not_forced": (
        ["ALTER TABLE public.lot_entries NO FORCE ROW LEVEL SECURITY"],
        ["structure.rls_forced:public.lot_entries"],
        ["public.lot_entries", "relforcerowsecurity = False"],
    ),
    # Issue 12's guarantees: a damaged database is caught.
    "balance_trigger_dropped": (
        ["DROP TRIGGER lot_entries_apply_balance ON public.lot_entries"],
        ["behaviour.lot_never_overdrawn:public.lot_entries",
         "behaviour.balance_matches_journal:public.credit_lot_balances"],
        ["public.lot_entries", "succeeded"],
    ),
    "balance_check_dropped_and_guard_disabled": (
        ["ALTER TABLE public.credit_lot_balances DISABLE TRIGGER credit_lot_balances_no_update"],
        ["behaviour.balance_written_by_journal_only:public.credit_lot_balances"],
        ["public.credit_lot_balances"],
    ),
    "policy_back_to_zero_rows": (
        ["ALTER POLICY usage_events_tenant_isolation ON public.usage_events USING (community_id ="
         " NULLIF(current_setting('app.community_id', true), '')::uuid)"],
        ["behaviour.no_context_raises:public.usage_events"],
        ["public.usage_events", "succeeded"],
    ),
    "fence_guard_dropped": (
        ["DROP TRIGGER reconciliation_cursor_fence ON public.reconciliation_cursor"],
        ["behaviour.fence_never_moves_back:public.reconciliation_cursor"],
        ["public.reconciliation_cursor"],
    ),
    "payment_final_statuses_lost": (
        ["CREATE OR REPLACE FUNCTION public.enforce_payment_status_monotonicity() RETURNS trigger LANGUAGE plpgsql"
         " SET search_path = pg_catalog, pg_temp AS $$ BEGIN RETURN NEW; END $$"],
        ["behaviour.payment_final_and_id_once:public.crypto_payments"],
        ["public.crypto_payments"],
    ),
    "key_guard_dropped": (
        ["DROP TRIGGER s2s_jwks_public_keys_guard ON public.s2s_jwks_public_keys"],
        ["behaviour.key_revoked_once:public.s2s_jwks_public_keys"],
        ["public.s2s_jwks_public_keys"],
    ),
    "amount_bound_dropped": (
        ["ALTER TABLE public.credit_lots DROP CONSTRAINT credit_lots_amount_micro_check"],
        ["behaviour.amounts_bounded:public.credit_lots"],
        ["public.credit_lots"],
    ),
    "lot_lock_privilege_revoked": (
        ["REVOKE UPDATE (status) ON public.credit_lots FROM arrakis_app"],
        ["structure.app_privileges:public.credit_lots", "behaviour.debit_path_locks_lots:public.credit_lots"],
        ["public.credit_lots", "missing: UPDATE(status)"],
    ),
    "update_granted_to_app": (
        ["GRANT UPDATE ON public.credit_lots TO arrakis_app"],
        ["structure.app_privileges:public.credit_lots"],
        ["public.credit_lots", "unexpected: UPDATE"],
    ),
    "monotonicity_trigger_disabled": (
        ["ALTER TABLE public.crypto_payments DISABLE TRIGGER crypto_payments_status_monotonicity"],
        ["structure.monotonicity_trigger:public.crypto_payments", "runbook.crypto_payments_triggers:public.crypto_payments",
         "behaviour.payment_status_monotonic:public.crypto_payments"],
        ["public.crypto_payments", "crypto_payments_status_monotonicity", "disabled"],
    ),
    "lot_balances_without_security_invoker": (
        [VIEW_WITHOUT_INVOKER],
        ["structure.view_security_invoker:public.lot_balances", "behaviour.tenant_isolation:public.lot_balances",
         "behaviour.no_context_raises:public.lot_balances"],
        ["public.lot_balances", "1 of tenant B's"],
    ),
    "search_path_unpinned": (
        ["ALTER FUNCTION app.update_lot_status(uuid, text) RESET search_path"],
        ["structure.function_search_path:app.update_lot_status(uuid,text)"],
        ["app.update_lot_status(uuid,text)", "search_path not pinned"],
    ),
    "public_execute_on_security_definer": (
        ["GRANT EXECUTE ON FUNCTION app.update_lot_status(uuid, text) TO PUBLIC"],
        ["structure.function_no_public_execute:app.update_lot_status(uuid,text)"],
        ["app.update_lot_status(uuid,text)", "PUBLIC holds EXECUTE"],
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_named(ledger_db, damage):
    statements, must_fail, in_message = DAMAGE[damage]
    execute(ledger_db, *statements)
    before = census(ledger_db)
    result = run_verify(ledger_db)
    assert result["failed"] and result["verification_failed"]
    missing = [cid for cid in must_fail if cid not in result["failed_checks"]]
    assert not missing, result["msg"]
    for text in in_message:
        assert text in result["msg"]
    assert "Next:" in result["msg"] and "playbooks/verify.yml -l testenv" in result["msg"]
    # Even a failing verify leaves no row behind (its event creates the migrations schema here), and logs its failure.
    after = census(ledger_db)
    assert {t: after[t] for t in LEDGER_TABLES} == {t: before[t] for t in LEDGER_TABLES}
    assert scalar(ledger_db, "SELECT outcome FROM migrations.events WHERE action = 'verify' ORDER BY id DESC LIMIT 1") == "failed"


def test_failure_message_lists_check_relation_observed_and_expected(ledger_db):
    execute(ledger_db, "ALTER TABLE public.credit_lots NO FORCE ROW LEVEL SECURITY")
    result = run_verify(ledger_db)
    line = [ln for ln in result["msg"].splitlines() if ln.startswith("- structure.rls_forced")]
    assert line == ["- structure.rls_forced on public.credit_lots: relforcerowsecurity = False (expected: true)"]
    assert result["msg"].splitlines()[0].startswith("verify failed on postgres@127.0.0.1:")
    assert "0009_credit_lots_lot_entries.sql" in result["msg"]


# --------------------------------------------------------------------------- the cost of "nothing left"

def _tuples_read(url: str, table: str) -> int:
    """Tuples this table has handed out to scans so far (sequential and index), from the statistics."""
    return scalar(url, "SELECT coalesce(t.seq_tup_read, 0) + (SELECT coalesce(sum(i.idx_tup_read), 0)"
                       " FROM pg_stat_user_indexes i WHERE i.relid = t.relid)"
                       " FROM pg_stat_user_tables t WHERE t.relid = %s::regclass", (f"public.{table}",))


def test_proving_nothing_is_left_reads_no_table_in_full(pg_cluster, ledger_template):
    """On a big ledger, verify must not count every row: its leftover check reads only its own keys."""
    name = pg_cluster.create_db(template=ledger_template)
    url = pg_cluster.url(name)
    try:
        execute(url, SEED,
                "INSERT INTO public.webhook_events (provider, event_id, payload)"
                " SELECT 'x402', 'bulk-' || g, '{}' FROM generate_series(1, 20000) g",
                "INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer)"
                " SELECT 'bulk-' || g, 'x', 'y', 'finn' FROM generate_series(1, 20000) g",
                "ANALYZE public.webhook_events, public.s2s_jwks_public_keys")
        before = {t: _tuples_read(url, t) for t in ("webhook_events", "s2s_jwks_public_keys")}
        result = run_verify(url)
        assert not result.get("failed"), result["msg"]
        assert by_id(result)["cleanup.no_rows_left"]["status"] == "passed"
        # Statistics reach the shared counters when the backend ends; verify's connections have ended.
        read = {t: _tuples_read(url, t) - before[t] for t in before}
        assert all(n < 1000 for n in read.values()), read  # a count(*) would read 20000 each, twice
    finally:
        pg_cluster.drop_db(name)


def test_leftover_check_finds_verifys_rows_by_tenant_and_key(ledger_db):
    """The proof is not vacuous: rows of verify's tenants or keys that survived are found and named."""
    tenant, other, marker = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4().hex[:12]
    applied = list(Expectations.load().known_versions)
    conn = psycopg2.connect(ledger_db)
    conn.autocommit = True
    try:
        assert leftover_rows(conn, [tenant, other], [marker], applied, 30000) == {}
        with conn.cursor() as cur:
            cur.execute("BEGIN; SELECT app.set_community_context(%s);"
                        " INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (%s, 'seed', 1);"
                        " INSERT INTO public.reconciliation_cursor (community_id) VALUES (%s); COMMIT",
                        (tenant, tenant, tenant))
            cur.execute("INSERT INTO public.webhook_events (provider, event_id) VALUES ('nowpayments', %s)",
                        (webhook_event_ids(marker)[1],))
            cur.execute("INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer) VALUES (%s, 'x', 'y', 'finn')",
                        (jwks_kid(marker),))
        found = leftover_rows(conn, [tenant, other], [marker], applied, 30000)
        assert found == {"credit_lots": 1, "reconciliation_cursor": 1, "webhook_events": 1,
                         "s2s_jwks_public_keys": 1}
        # Another run's marker and tenants see none of them.
        assert leftover_rows(conn, [other], [uuid.uuid4().hex[:12]], applied, 30000) == {}
    finally:
        conn.close()
