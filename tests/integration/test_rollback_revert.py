"""Revert with the down scripts (ledger_rollback mode=revert) against a real PostgreSQL 15.

Migrations are applied by the engine (so migrations.history is real); the module under test
plans (read-only: missing down scripts, rehearsal, rows that would be lost) and reverts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from pghelpers import history, load_module, q

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "files" / "migrations"
SET_0011 = ["0008", "0009", "0010", "0011"]
LEDGER_TABLES = ["public.credit_lot_balances", "public.credit_lots", "public.crypto_payments", "public.lot_entries",
                 "public.reconciliation_cursor", "public.s2s_jwks_public_keys", "public.usage_events",
                 "public.webhook_events"]



rollback = load_module("ledger_rollback")
backup = load_module("ledger_backup")




def tables(url):
    return [r[0] for r in q(url, "SELECT schemaname || '.' || tablename FROM pg_tables"
                                 " WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'migrations')"
                                 " ORDER BY 1")]


def schema_dump(cluster, url):
    res = subprocess.run([cluster.bin("pg_dump"), "--schema-only", "--exclude-schema=migrations", "-d", url],
                         capture_output=True, text=True, check=True)
    # pg_dump 15.14+ brackets its output with \restrict <random key>: not part of the schema.
    return "\n".join(line for line in res.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def migrate(url, directory=MIGRATIONS, target=None):
    return ledger_engine.apply(url, ledger_engine.load_migration_set(str(directory)), target=target,
                               run_id="test-apply")


def seed_lot(url):
    q(url, "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
           " VALUES ('22222222-2222-2222-2222-222222222222', 'seed', 5000000)")


@pytest.fixture
def db(empty_db):
    """A fresh database migrated to 0011 by the engine."""
    migrate(empty_db)
    assert history(empty_db) == SET_0011
    return empty_db


def revert(url, check_mode=False, directory=MIGRATIONS, **params):
    args = {"database_url": url, "mode": "revert", "migrations_dir": str(directory), "run_id": "test-rollback",
            "host_label": "testhost", "lock_retries": 0}
    args.update(params)
    return rollback.run(args, check_mode=check_mode)


# --------------------------------------------------------------------------- to a version, to base

def test_revert_to_a_version_runs_the_down_scripts_newest_first(db):
    plan = revert(db, step="plan", rollback_to="0009")
    assert [r["version"] for r in plan["to_revert"]] == ["0011", "0010"]
    assert plan["data_at_risk"] == [] and plan["changed"] is False
    assert history(db) == SET_0011

    result = revert(db, rollback_to="0009")
    assert result["reverted"] == ["0011", "0010"]
    assert result["changed"] is True and result["version_after"] == "0009"
    assert history(db) == ["0008", "0009"]
    assert tables(db) == ["public.credit_lot_balances", "public.credit_lots", "public.lot_entries"]
    events = q(db, "SELECT version FROM migrations.events WHERE action = 'revert' AND outcome = 'ok' ORDER BY id")
    assert [e[0] for e in events] == ["0011", "0010"]
    # Nothing above 0009 left: a second run has nothing to do.
    again = revert(db, rollback_to="0009")
    assert again["reverted"] == [] and again["changed"] is False


def test_revert_to_base_keeps_only_the_records(db):
    result = revert(db, rollback_to="base")
    assert result["reverted"] == ["0011", "0010", "0009", "0008"]
    assert history(db) == []
    assert tables(db) == []
    assert q(db, "SELECT to_regnamespace('app') IS NULL, to_regclass('migrations.events') IS NOT NULL") == [
        (True, True)]


def test_up_down_up_gives_the_schema_of_a_single_up(pg_cluster, db, empty_db):
    once = schema_dump(pg_cluster, db)
    revert(db, rollback_to="base")
    assert schema_dump(pg_cluster, db) != once
    migrate(db)
    assert history(db) == SET_0011
    assert schema_dump(pg_cluster, db) == once


# --------------------------------------------------------------------------- nothing lost by accident

def test_rows_in_a_table_to_drop_refuse_the_revert_and_name_the_table(db):
    seed_lot(db)
    seed_lot(db)
    for step in ("plan", "run"):
        with pytest.raises(LedgerError) as err:
            revert(db, step=step, rollback_to="0008")
        msg = err.value.msg
        assert "public.credit_lots: 2 rows (dropped by 0009)" in msg
        assert "rollback_allow_data_loss=true" in msg and "-e rollback_to=0008" in msg
        assert err.value.fields["refused"] == "data_loss"
    assert history(db) == SET_0011
    assert q(db, "SELECT count(*) FROM public.credit_lots")[0][0] == 2
    # The tables of 0010 and 0011 are empty: reverting them loses nothing and is allowed.
    assert revert(db, rollback_to="0009")["reverted"] == ["0011", "0010"]


def test_data_loss_override_requires_a_verified_backup_of_the_current_version(db, tmp_path):
    seed_lot(db)
    plan = revert(db, step="plan", rollback_to="0008", allow_data_loss=True)
    assert plan["backup_needed"] is True
    # The lot and the balance row the database keeps for it.
    assert sorted((r["table"], r["rows"]) for r in plan["data_at_risk"]) == [("public.credit_lot_balances", 1),
                                                                             ("public.credit_lots", 1)]

    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0008", allow_data_loss=True)
    assert "no verified backup" in err.value.msg
    assert history(db) == SET_0011

    taken = backup.run_backup({"database_url": db, "backup_dir": str(tmp_path), "retention": 0,
                               "run_id": "test-rollback"})
    result = revert(db, rollback_to="0008", allow_data_loss=True, data_loss_backup=taken["backup_file"])
    assert result["reverted"] == ["0011", "0010", "0009"]
    assert result["data_loss_backup"] == taken["backup_file"]
    assert "public.credit_lots: 1 row" in result["msg"]
    # The dropped row is in the backup.
    data = subprocess.run(["pg_restore", "--data-only", "--table=credit_lots", "-f", "-", taken["backup_file"]],
                          capture_output=True, text=True, check=True).stdout
    assert "22222222-2222-2222-2222-222222222222" in data

    # That backup does not hold rows written later: another run needs its own.
    migrate(db)
    seed_lot(db)
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0008", allow_data_loss=True, data_loss_backup=taken["backup_file"],
               run_id="a-later-run")
    assert "not by this run" in err.value.msg
    # Nor does a backup of another version.
    revert(db, rollback_to="0010")
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0008", allow_data_loss=True, data_loss_backup=taken["backup_file"])
    assert "was taken at 0008, 0009, 0010, 0011, the target is now at 0008, 0009, 0010" in err.value.msg
    assert history(db) == ["0008", "0009", "0010"]


def test_dropped_columns_and_tables_are_found_by_comparing_objects(db, tmp_path):
    """A down script that drops a column, and a table through DROP SCHEMA ... CASCADE."""
    work = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, work)
    (work / "0012_extras.sql").write_text(
        "CREATE SCHEMA rb_extra;\nCREATE TABLE rb_extra.notes (id int);\n"
        "ALTER TABLE public.reconciliation_cursor ADD COLUMN note text;\n")
    (work / "0012_extras.down.sql").write_text(
        "ALTER TABLE public.reconciliation_cursor DROP COLUMN note;\nDROP SCHEMA rb_extra CASCADE;\n")
    migrate(db, work)
    q(db, "INSERT INTO rb_extra.notes VALUES (1), (2), (3)")
    q(db, "INSERT INTO public.reconciliation_cursor (community_id, note)"
          " VALUES ('33333333-3333-3333-3333-333333333333', 'kept?')")
    with pytest.raises(LedgerError) as err:
        revert(db, step="plan", rollback_to="0011", directory=work)
    assert "rb_extra.notes: 3 rows (dropped by 0012)" in err.value.msg
    assert "column public.reconciliation_cursor.note: 1 row (dropped by 0012)" in err.value.msg
    # A NULL-only column loses nothing.
    q(db, "DELETE FROM rb_extra.notes")
    q(db, "TRUNCATE public.reconciliation_cursor")
    q(db, "INSERT INTO public.reconciliation_cursor (community_id) VALUES ('33333333-3333-3333-3333-333333333333')")
    plan = revert(db, step="plan", rollback_to="0011", directory=work)
    assert plan["data_at_risk"] == []
    assert plan["rehearsal"][0]["dropped_tables"] == ["rb_extra.notes"]
    assert plan["rehearsal"][0]["dropped_columns"] == ["public.reconciliation_cursor.note"]


# --------------------------------------------------------------------------- refusals before any change

def test_a_missing_down_script_stops_the_revert_before_any_change_and_offers_restore(db, tmp_path):
    work = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, work)
    next(work.glob("0010_*.down.sql")).unlink()
    for step in ("plan", "run"):
        with pytest.raises(LedgerError) as err:
            revert(db, step=step, rollback_to="0008", directory=work)
        assert "no down script for 0010" in err.value.msg
        assert "-e rollback_mode=restore" in err.value.msg
        assert err.value.fields["missing_down"] == ["0010"]
    assert history(db) == SET_0011
    assert tables(db) == LEDGER_TABLES
    # Above the gap, a revert is still possible.
    assert revert(db, rollback_to="0010", directory=work)["reverted"] == ["0011"]


def test_a_down_script_failing_in_rehearsal_names_file_line_and_sqlstate(db, tmp_path):
    work = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, work)
    down = next(work.glob("0010_*.down.sql"))
    text = down.read_text()
    down.write_text(text + "\nSELECT 1 / 0;\n")
    line = len((text + "\n").splitlines()) + 1
    with pytest.raises(LedgerError) as err:
        revert(db, step="plan", rollback_to="0009", directory=work)
    assert "%s line %d" % (down, line) in err.value.msg
    assert "SQLSTATE 22012" in err.value.msg
    assert history(db) == SET_0011 and tables(db) == LEDGER_TABLES


def test_unknown_versions_are_refused(db):
    with pytest.raises(LedgerError, match="neither applied"):
        revert(db, step="plan", rollback_to="0042")
    with pytest.raises(LedgerError, match="neither a 4-digit version"):
        revert(db, step="plan", rollback_to="9")
    with pytest.raises(LedgerError, match="rollback_to is required"):
        revert(db, step="plan")


# --------------------------------------------------------------------------- check mode, exact versions

def test_check_mode_rehearses_and_changes_nothing(pg_cluster, db):
    seed_lot(db)
    before = schema_dump(pg_cluster, db)
    events = q(db, "SELECT count(*) FROM migrations.events")[0][0]
    result = revert(db, check_mode=True, rollback_to="base", allow_data_loss=True)
    assert result["msg"].startswith("would revert 0011, 0010, 0009, 0008")
    assert "public.credit_lots: 1 row" in result["msg"]
    assert [r["status"] for r in result["engine_rehearsal"]] == ["would_apply"] * 4
    assert result["reverted"] == []
    assert schema_dump(pg_cluster, db) == before
    assert history(db) == SET_0011
    assert q(db, "SELECT count(*) FROM migrations.events")[0][0] == events


def test_exact_versions_revert_what_a_run_applied(db):
    with pytest.raises(LedgerError, match="not the newest applied"):
        revert(db, step="plan", versions=["0009"])
    plan = revert(db, step="plan", versions=["0011", "0010", "0012"])
    assert plan["to_version"] == "0009" and plan["not_applied"] == ["0012"]
    result = revert(db, versions=["0010", "0011"])
    assert result["reverted"] == ["0011", "0010"]
    assert history(db) == ["0008", "0009"]
    assert revert(db, versions=["0009", "0008"])["to_version"] == "base"
    assert history(db) == []
    assert "the run applied none of its migrations" in revert(db, step="plan", versions=[])["msg"]


# --------------------------------------------------------------------------- rows written between the plan and the DROP

def hold_the_lease(url):
    """Another run's lease: the engine's revert waits for it (after the plan has counted), logging lock_wait."""
    q(url, "INSERT INTO migrations.lock (id, run_id, holder, expires_at)"
           " VALUES (1, 'other-run', 'someone else', now() + interval '1 hour')")


def when_the_revert_waits(url, run_id, *statements):
    """In a thread: once the revert of `run_id` waits for the lease (the plan is done), run the statements
    (committed), then release the lease. Returns the thread; join it after the revert."""
    errors = []

    def act():
        try:
            deadline = time.time() + 30
            while not q(url, "SELECT 1 FROM migrations.events WHERE action = 'lock_wait' AND outcome = 'waiting'"
                             " AND run_id = %s", (run_id,)):
                assert time.time() < deadline, "the revert never waited for the lease"
                time.sleep(0.05)
            for stmt in statements:
                q(url, stmt)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            q(url, "DELETE FROM migrations.lock WHERE run_id = 'other-run'")

    thread = threading.Thread(target=act)
    thread.errors = errors
    thread.start()
    return thread


SEED_SQL = ("INSERT INTO public.credit_lots (community_id, source, amount_micro)"
            " VALUES ('55555555-5555-5555-5555-555555555555', 'seed', 1)")


def test_a_row_written_after_the_plan_stops_the_revert_inside_its_transaction(db):
    """The plan counts 0 rows; a row is committed before the DROP: the guard, under the DROP's own lock, sees it."""
    hold_the_lease(db)
    thread = when_the_revert_waits(db, "test-race", SEED_SQL)
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0008", run_id="test-race", lock_wait=30)
    thread.join()
    assert not thread.errors, thread.errors
    msg = err.value.msg
    assert "stopped the revert of 0009" in msg and "before its down script ran" in msg
    assert "public.credit_lots: 1 row now, 0 allowed (the plan found none)" in msg
    assert "reverted before it (committed): 0011, 0010" in msg and "0009 is still applied" in msg
    assert err.value.fields["refused"] == "rows_since_plan" and err.value.fields["sqlstate"] == "LR001"
    # 0011 and 0010 (their tables empty) are reverted; 0009 and its row are intact.
    assert history(db) == ["0008", "0009"]
    assert q(db, "SELECT count(*) FROM public.credit_lots")[0][0] == 1
    failed = q(db, "SELECT version FROM migrations.events WHERE action = 'revert' AND outcome = 'failed'")
    assert failed == [("0009",)]


def test_rows_beyond_the_data_loss_backup_stop_the_revert(db, tmp_path):
    """With rollback_allow_data_loss, a table may hold what the backup counted, not one row more."""
    seed_lot(db)
    taken = backup.run_backup({"database_url": db, "backup_dir": str(tmp_path), "retention": 0,
                               "run_id": "test-rollback"})
    assert json.loads(Path(taken["manifest"]).read_text())["row_counts"]["public.credit_lots"] == 1
    hold_the_lease(db)
    thread = when_the_revert_waits(db, "test-rollback", SEED_SQL)
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0008", allow_data_loss=True, data_loss_backup=taken["backup_file"], lock_wait=30)
    thread.join()
    assert not thread.errors, thread.errors
    assert "public.credit_lots: 2 rows now, 1 in the backup %s" % taken["backup_file"] in err.value.msg
    assert history(db) == ["0008", "0009"]
    assert q(db, "SELECT count(*) FROM public.credit_lots")[0][0] == 2


def test_a_version_applied_after_the_plan_is_not_reverted_unplanned(db, tmp_path):
    work = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, work)
    (work / "0012_late.sql").write_text("CREATE TABLE public.rb_late (id int);\n")
    (work / "0012_late.down.sql").write_text("DROP TABLE public.rb_late;\n")
    checksum = hashlib.sha256((work / "0012_late.sql").read_bytes()).hexdigest()
    hold_the_lease(db)
    # Another run applies 0012 (and writes a row) while this one waits for the lease.
    thread = when_the_revert_waits(
        db, "test-rollback", "CREATE TABLE public.rb_late (id int); INSERT INTO public.rb_late VALUES (1)",
        "INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
        " VALUES ('0012', 'late', '%s', 'test', 1, 'other-run')" % checksum)
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0010", directory=work, lock_wait=30)
    thread.join()
    assert not thread.errors, thread.errors
    assert "0012 was applied after the plan" in err.value.msg
    assert err.value.fields["refused"] == "unplanned_version"
    assert history(db) == SET_0011 + ["0012"]
    assert q(db, "SELECT count(*) FROM public.rb_late")[0][0] == 1


def test_the_guard_runs_in_every_revert_that_drops_something(db):
    result = revert(db, rollback_to="0009")
    assert result["guarded"] == ["0011", "0010"]
    assert result["reverted"] == ["0011", "0010"]


def test_a_data_loss_backup_without_row_counts_is_refused(db, tmp_path):
    seed_lot(db)
    taken = backup.run_backup({"database_url": db, "backup_dir": str(tmp_path), "retention": 0,
                               "run_id": "test-rollback", "row_counts": False})
    assert json.loads(Path(taken["manifest"]).read_text())["row_counts"] is None
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0008", allow_data_loss=True, data_loss_backup=taken["backup_file"])
    assert "no row counts" in err.value.msg
    assert history(db) == SET_0011


def test_an_engine_refusal_during_the_run_keeps_its_message(db):
    """Another run holds the lease beyond lock_wait: the engine's refusal reaches the operator as it is."""
    hold_the_lease(db)
    with pytest.raises(LedgerError) as err:
        revert(db, rollback_to="0009", lock_wait=0.5)
    assert "someone else" in err.value.msg or "other-run" in err.value.msg
    assert err.value.fields["plan_msg"].startswith("will revert 0011, 0010")
    assert history(db) == SET_0011
