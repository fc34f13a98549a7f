"""After `playbooks/migrate.yml` converged: the database holds the ledger at the newest version of
files/migrations (the runbook's 0011, or an operator's own migration above it).

testinfra runs these on the control node (local://), where the scenario's
PostgreSQL listens; every assertion reads the real database through psql.
"""

import os
import json

import pytest
from ledgertest import shipped_versions

PORT_BASE = int(os.environ.get("LEDGER_MOLECULE_PORT_BASE", "55600"))
URL = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 11}/ledger"
LEDGER_TABLES = {
    "credit_lots", "lot_entries", "credit_lot_balances", "webhook_events", "crypto_payments",
    "usage_events", "s2s_jwks_public_keys", "reconciliation_cursor",
}
# Tenant tables (RLS); the reconciler's cursor is a service's table and the other two are global.
TENANT_TABLES = LEDGER_TABLES - {"webhook_events", "s2s_jwks_public_keys", "reconciliation_cursor"}
APPEND_ONLY = ["credit_lots", "lot_entries", "usage_events", "webhook_events"]


def sql(host, query):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", URL, query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


def test_history_has_every_version_of_the_set_with_checksums(host):
    rows = json.loads(sql(host, "SELECT json_agg(json_build_object('v', version, 'c', checksum) ORDER BY version)"
                                " FROM migrations.history"))
    assert [r["v"] for r in rows] == shipped_versions()
    assert [r["v"] for r in rows][:4] == ["0008", "0009", "0010", "0011"]
    assert all(len(r["c"]) == 64 for r in rows)


def test_the_eight_ledger_tables_exist(host):
    names = set(sql(host, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").split())
    assert LEDGER_TABLES <= names


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
def test_rls_enabled_and_forced_on_tenant_tables(host, table):
    assert sql(host, f"SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE oid = 'public.{table}'::regclass") == "t"


def test_the_reconcilers_cursor_has_no_rls(host):
    assert sql(host, "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.reconciliation_cursor'::regclass") == "f"


@pytest.mark.parametrize("table", APPEND_ONLY)
def test_append_only_triggers_enabled(host, table):
    count = sql(host, f"SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.{table}'::regclass"
                      " AND NOT tgisinternal AND tgenabled <> 'D'")
    assert int(count) >= 2, f"{table}: expected enabled no-update/no-delete/no-truncate triggers"


def test_update_of_a_lot_is_refused_with_p0002(host):
    # Inside a transaction that psql never commits (ON_ERROR_STOP aborts it).
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c %s", URL,
                   "BEGIN; SELECT app.set_community_context('00000000-0000-0000-0000-000000000001');"
                   " INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                   " VALUES ('00000000-0000-0000-0000-000000000001', 'seed', 1000000);"
                   " UPDATE public.credit_lots SET amount_micro = 1; ROLLBACK;")
    assert cmd.rc != 0
    assert "P0002" in cmd.stderr
    assert sql(host, "SELECT count(*) FROM public.credit_lots") == "0"


def test_app_role_holds_no_update_delete_truncate(host):
    for table in APPEND_ONLY:
        for priv in ("UPDATE", "DELETE", "TRUNCATE"):
            assert sql(host, f"SELECT has_table_privilege('arrakis_app', 'public.{table}', '{priv}')") == "f", (table, priv)


def test_guard_raises_p0001_without_context(host):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c %s", URL,
                   "SELECT app.current_community_id()")
    assert cmd.rc != 0
    assert "P0001" in cmd.stderr and "app.community_id is not set" in cmd.stderr


def test_monotonicity_trigger_on_crypto_payments(host):
    names = sql(host, "SELECT string_agg(tgname, ',') FROM pg_trigger"
                      " WHERE tgrelid = 'public.crypto_payments'::regclass AND NOT tgisinternal")
    assert "monoton" in names


def test_events_record_the_run(host):
    actions = set(sql(host, "SELECT DISTINCT action FROM migrations.events").split())
    assert "apply" in actions
