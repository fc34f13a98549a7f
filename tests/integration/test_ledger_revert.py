"""The ledger migrations as files: revert and re-run, conflicts, a non-superuser owner, lint.

- up -> down -> up gives a schema identical to a single up, and each down script
  restores exactly the schema before its migration (`pg_dump --schema-only`);
- a conflicting object fails the whole file with 42P07 and leaves nothing behind;
- missing roles stop 0008 with a clear message;
- applied by an ordinary (non-superuser) owner, the owner is held to RLS and the
  SECURITY DEFINER function still works;
- squawk is clean over the up scripts with the project's .squawk.toml, and still
  catches what it must.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg2
import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import RECORDS_DDL

from test_ledger_sql import Session, Tenant, seed_tenant
from ledgertest import UPS, down_of

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "files" / "migrations"
def execute_file(url: str, path: Path) -> None:
    """One file in one transaction, as the engine and the conftest apply them."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(path.read_text())
    finally:
        conn.close()


def schema_dump(pg_cluster, url: str) -> str:
    res = subprocess.run([pg_cluster.bin("pg_dump"), "--schema-only", "--no-password", "-d", url],
                         capture_output=True, text=True, check=True, timeout=60)
    # pg_dump >= 15.14 brackets its output with \restrict <random key>: not schema.
    return "\n".join(line for line in res.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def test_up_down_up_gives_the_same_schema_and_each_down_undoes_its_migration(pg_cluster, empty_db):
    with psycopg2.connect(empty_db) as conn, conn.cursor() as cur:
        cur.execute(RECORDS_DDL)  # the engine's records exist before 0008 and must survive every down
        cur.execute("INSERT INTO migrations.events (run_id, actor, action, outcome) VALUES ('r', 't', 'test', 'ok')")
    conn.close()
    stages = [schema_dump(pg_cluster, empty_db)]
    for up in UPS:
        execute_file(empty_db, up)
        stages.append(schema_dump(pg_cluster, empty_db))
    assert len(set(stages)) == len(stages), "a migration changed nothing"
    for i in range(len(UPS), 0, -1):
        execute_file(empty_db, down_of(UPS[i - 1]))
        assert schema_dump(pg_cluster, empty_db) == stages[i - 1], f"{down_of(UPS[i - 1]).name} is not an exact undo"
    for up in UPS:
        execute_file(empty_db, up)
    assert schema_dump(pg_cluster, empty_db) == stages[-1]
    with psycopg2.connect(empty_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM migrations.events")
        assert cur.fetchone()[0] == 1
    conn.close()


def test_down_refuses_to_drop_what_it_did_not_create(ledger_db):
    # Something built on the ledger by hand: the down stops (2BP01) instead of a silent CASCADE.
    with psycopg2.connect(ledger_db) as conn, conn.cursor() as cur:
        cur.execute("CREATE VIEW public.report AS SELECT count(*) FROM public.usage_events")
    conn.close()
    with pytest.raises(psycopg2.Error) as exc:
        execute_file(ledger_db, down_of(UPS[-1]))
    assert exc.value.pgcode == "2BP01"
    with psycopg2.connect(ledger_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.reconciliation_cursor') IS NOT NULL")
        assert cur.fetchone()[0], "the failed down left a partial revert"
    conn.close()


def test_conflicting_object_fails_the_whole_file_with_42P07(empty_db):
    execute_file(empty_db, UPS[0])
    with psycopg2.connect(empty_db) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE public.lot_entries (id int)")  # created late in 0009
    conn.close()
    with pytest.raises(psycopg2.Error) as exc:
        execute_file(empty_db, UPS[1])
    assert exc.value.pgcode == "42P07"
    assert 'relation "lot_entries" already exists' in exc.value.pgerror
    with psycopg2.connect(empty_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.credit_lots'), to_regprocedure('public.prevent_mutation()')")
        assert cur.fetchone() == (None, None), "0009 was partially applied"
    conn.close()


@pytest.mark.parametrize("up", UPS, ids=lambda p: p.name[:4])
def test_reapplying_an_applied_migration_fails_clearly(ledger_db, up):
    with pytest.raises(psycopg2.Error) as exc:
        execute_file(ledger_db, up)
    assert exc.value.pgcode in ("42P06", "42P07", "42723"), exc.value.pgerror
    assert "already exists" in exc.value.pgerror


def test_0008_stops_clearly_when_the_roles_are_missing(empty_db):
    conn = psycopg2.connect(empty_db)
    try:
        with conn.cursor() as cur:
            # Renaming is transactional: rolled back below, the cluster's role is untouched.
            cur.execute("ALTER ROLE arrakis_admin RENAME TO arrakis_admin_hidden_by_test")
            with pytest.raises(psycopg2.Error) as exc:
                cur.execute(UPS[0].read_text())
    finally:
        conn.rollback()
        conn.close()
    assert exc.value.pgcode == "42704"
    assert "role(s) arrakis_admin do not exist" in exc.value.pgerror
    assert "pre-migration checklist" in exc.value.pgerror


@pytest.fixture
def owned_db(pg_cluster):
    """A database whose ledger is applied by an ordinary LOGIN role (no superuser, no BYPASSRLS)."""
    role = "ledger_owner_" + uuid.uuid4().hex[:8]
    name = "t_" + uuid.uuid4().hex[:10]
    admin = pg_cluster.connect()
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
        cur.execute(f'CREATE DATABASE "{name}"')
        cur.execute(f'GRANT CREATE ON DATABASE "{name}" TO {role}')
    db = pg_cluster.connect(name)
    with db.cursor() as cur:
        cur.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    db.close()
    try:
        yield role, pg_cluster.url(name), pg_cluster.url(name, user=role)
    finally:
        pg_cluster.drop_db(name)
        with admin.cursor() as cur:
            cur.execute(f"DROP ROLE {role}")
        admin.close()


def test_non_superuser_owner_is_held_to_rls_and_the_definer_function_works(owned_db):
    role, su_url, owner_url = owned_db
    for up in UPS:
        execute_file(owner_url, up)
    app = Session(su_url, user="arrakis_app")
    owner = Session(owner_url)
    try:
        a, b = Tenant(uuid.uuid4()), Tenant(uuid.uuid4())
        seed_tenant(app, a, "a")
        seed_tenant(app, b, "b")
        assert owner.one("SELECT tableowner FROM pg_tables WHERE tablename = 'credit_lots'") == role
        # The owner is held to the same tenant rule (FORCE ROW LEVEL SECURITY): no context, P0001.
        for rel in ("credit_lots", "credit_lot_balances", "lot_balances"):
            assert owner.fails(f"SELECT * FROM public.{rel}").pgcode == "P0001", rel
        assert {r[0] for r in owner.run("SELECT community_id FROM public.lot_balances", tenant=a.id)} == {str(a.id)}
        err = owner.fails("INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                          " VALUES (%s, 'seed', 1)", (str(a.id),))
        assert err.pgcode == "P0001"
        assert owner.fails("DELETE FROM public.lot_entries", tenant=a.id).pgcode == "P0002"
        # app.update_lot_status runs as this owner: it sees (and changes) only the context's lot.
        app.run("SELECT app.update_lot_status(%s, 'expired')", (a.lots[1],), tenant=a.id)
        assert owner.one("SELECT status FROM public.credit_lots WHERE id = %s", (a.lots[1],), tenant=a.id) == "expired"
        err = app.fails("SELECT app.update_lot_status(%s, 'expired')", (b.lots[1],), tenant=a.id)
        assert err.pgcode == "P0002" and "not found" in err.pgerror
    finally:
        app.close()
        owner.close()
    for up in reversed(UPS):
        execute_file(owner_url, down_of(up))
    with psycopg2.connect(su_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT to_regnamespace('app')")
        assert cur.fetchone()[0] is None
    conn.close()





