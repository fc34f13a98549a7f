"""The migration engine (module_utils/ledger_engine.py) against a real PostgreSQL 15.

Each test builds a tiny migration set in tmp_path and runs it on a fresh database
(empty_db). Lock, lease and concurrency behaviour is in test_engine_locks.py; the
Ansible module and role in test_engine_module.py.
"""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from pghelpers import history, q
from ledgertest import BASIC, load, write_set


# --------------------------------------------------------------------------- helpers

def one(url, sql, params=None):
    return q(url, sql, params)[0][0]


def events(url, action=None):
    sql = "SELECT action, version, outcome, detail FROM migrations.events"
    if action:
        return [r for r in q(url, sql + " WHERE action = %s ORDER BY id", (action,))]
    return q(url, sql + " ORDER BY id")


def run(url, directory, **kw):
    kw.setdefault("advice", PlaybookAdvice("testenv"))
    kw.setdefault("lock_timeout", "1s")
    return engine.apply(url, load(directory), **kw)


# --------------------------------------------------------------------------- the SQL splitter


# --------------------------------------------------------------------------- the migration set


# --------------------------------------------------------------------------- apply, history, events

def test_apply_records_history_and_events_then_is_idempotent(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    res = run(empty_db, d, run_id="run-1")
    assert res["changed"] is True
    assert [a["version"] for a in res["applied"]] == ["0001", "0002", "0003"]
    rows = q(empty_db, "SELECT version, name, checksum, applied_by, execution_ms, run_id, kind"
                       " FROM migrations.history ORDER BY version")
    assert [r[0] for r in rows] == ["0001", "0002", "0003"]
    assert rows[0][1] == "accounts" and rows[0][2] == load(d)[0].checksum
    assert all(r[3] and r[4] >= 0 and r[5] == "run-1" and r[6] == "apply" for r in rows)
    ev = events(empty_db, "apply")
    assert [(e[1], e[2]) for e in ev] == [("0001", "ok"), ("0002", "ok"), ("0003", "ok")]
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0  # the lease is released

    n_events = one(empty_db, "SELECT count(*) FROM migrations.events")
    again = run(empty_db, d)
    assert again["changed"] is False and again["applied"] == []
    assert "nothing to apply" in again["msg"]
    assert one(empty_db, "SELECT count(*) FROM migrations.events") == n_events  # writes nothing at all


def test_a_failing_migration_leaves_nothing_and_reports_file_line_sqlstate(tmp_path, pg_cluster, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_ok.sql": "CREATE TABLE kept (i int);",
        "0002_broken.sql": """
            -- a multi-statement migration failing at run time on line 6
            CREATE TABLE half (i int);
            INSERT INTO half VALUES (1);

            SELECT 1 /
                   0;
            CREATE TABLE never (i int);
        """,
    })
    url = empty_db.replace("postgres@", "postgres:s3cr3t-pw@")  # trust auth: the password is unused, never shown
    with pytest.raises(LedgerError) as exc:
        run(url, d, run_id="run-fail")
    e = exc.value
    assert e.fields["sqlstate"] == "22012" and e.fields["file"] == "0002_broken.sql"
    assert e.fields["line"] == 5  # runtime error: the failing statement's first line
    assert e.fields["target"] == "postgres@127.0.0.1:%d/%s" % (pg_cluster.port, empty_db.rsplit("/", 1)[1])
    assert e.fields["applied"] == ["0001"]
    assert "0002_broken.sql line 5" in e.msg and "SQLSTATE 22012" in e.msg and "division by zero" in e.msg
    assert "rollback.yml -l testenv -e rollback_to=base" in e.fields["next_command"]
    assert "s3cr3t" not in repr(e.msg) + repr(e.fields)
    # One transaction per migration: 0001 stays, nothing of 0002 does.
    assert history(empty_db) == ["0001"]
    assert one(empty_db, "SELECT to_regclass('public.half') IS NULL")
    ev = events(empty_db, "apply")[-1]
    assert ev[1:3] == ("0002", "failed") and ev[3]["sqlstate"] == "22012" and ev[3]["line"] == 5
    assert "s3cr3t" not in str(events(empty_db))


def test_a_syntax_error_is_reported_at_its_own_line_inside_a_statement(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_syntax.sql": """
            /* header
               comment */
            CREATE TABLE t1 (i int);
            CREATE TABLE t2 (
                a int,
                b int NOT NULL DEFAULT 'x;y',
                c innt
            );
        """,
    })
    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    assert exc.value.fields["sqlstate"] == "42704"  # type "innt" does not exist
    assert exc.value.fields["line"] == 7
    assert "0001_syntax.sql line 7" in exc.value.msg
    assert one(empty_db, "SELECT to_regclass('public.t1') IS NULL")


def test_an_error_raised_in_a_do_block_maps_to_the_raise_line(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_guard.sql": """
            CREATE TABLE t (i int);
            DO $guard$
            BEGIN
              IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'no_such_role') THEN
                RAISE EXCEPTION 'role no_such_role is missing'
                  USING ERRCODE = '42704', HINT = 'create it first';
              END IF;
            END
            $guard$;
        """,
    })
    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    f = exc.value.fields
    assert (f["sqlstate"], f["line"], f["hint"]) == ("42704", 5, "create it first")
    assert "hint: create it first" in exc.value.msg


# --------------------------------------------------------------------------- rehearsal

def test_rehearsal_runs_in_order_reports_per_file_and_writes_nothing(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_a.sql": "CREATE TABLE a (i int);\nCREATE SEQUENCE a_seq;\nSELECT nextval('a_seq');",
        "0002_b.sql": "INSERT INTO a VALUES (1);  -- sees 0001's table\n",
        "0003_c.sql": "SELECT 1;\nINSERT INTO a VALUES ('not a number');\n",
        "0004_d.sql": "CREATE TABLE d (i int);",
    })
    ms = load(d)
    results = engine.rehearse(empty_db, ms)
    assert [r["status"] for r in results] == ["would_apply", "would_apply", "would_fail", "not_rehearsed"]
    bad = results[2]
    assert (bad["sqlstate"], bad["file"], bad["line"]) == ("22P02", "0003_c.sql", 2)
    lines = engine.format_rehearsal(results)
    assert lines[2].startswith("0003_c.sql: would fail at line 2: SQLSTATE 22P02")
    # Nothing at all: no tables, no records schema.
    assert q(empty_db, "SELECT nspname FROM pg_namespace WHERE nspname = 'migrations'") == []
    assert one(empty_db, "SELECT to_regclass('public.a') IS NULL")


def test_rehearsal_of_a_managed_database_adds_no_event(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d, target="0001")
    before = one(empty_db, "SELECT count(*) FROM migrations.events")
    info = engine.inspect(empty_db, load(d))
    results = engine.rehearse(empty_db, info["pending"])
    assert [r["status"] for r in results] == ["would_apply", "would_apply"]
    assert one(empty_db, "SELECT count(*) FROM migrations.events") == before
    assert history(empty_db) == ["0001"] and one(empty_db, "SELECT to_regclass('public.entries') IS NULL")
    # The rehearsal of a real run (precheck) is recorded when asked.
    engine.rehearse(empty_db, info["pending"], run_id="real-run", record_event=True)
    ev = events(empty_db, "rehearse")
    assert len(ev) == 1 and ev[0][2] == "ok" and len(ev[0][3]["results"]) == 2


# --------------------------------------------------------------------------- drift

def test_drift_by_edit_stops_the_run_and_accept_checksum_records_the_edit(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d, target="0002")
    old = load(d)[0].checksum
    (d / "0001_accounts.sql").write_text((d / "0001_accounts.sql").read_text() + "-- edited\n")
    new = load(d)[0].checksum
    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    assert "refusing to apply" in exc.value.msg and old in exc.value.msg and new in exc.value.msg
    assert [(x["version"], x["kind"]) for x in exc.value.fields["drift"]] == [("0001", "edited")]
    assert history(empty_db) == ["0001", "0002"]  # 0003 not applied: stopped before any change
    assert events(empty_db, "apply")[-1][2] == "refused"

    res = engine.accept_checksum(empty_db, load(d), "0001", run_id="accept")
    assert res["changed"] and res["old_checksum"] == old and res["new_checksum"] == new
    assert one(empty_db, "SELECT checksum FROM migrations.history WHERE version = '0001'") == new
    ev = events(empty_db, "accept_checksum")
    assert ev[-1][3]["old_checksum"] == old and ev[-1][3]["new_checksum"] == new
    assert run(empty_db, d)["applied"][0]["version"] == "0003"


def test_drift_by_deletion_and_by_rename_are_named(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d)
    (d / "0002_entries.sql").rename(d / "0002_entry_table.sql")
    (d / "0002_entries.down.sql").rename(d / "0002_entry_table.down.sql")
    (d / "0003_entries_amount.sql").rename(d / "0004_entries_amount.sql")
    (d / "0003_entries_amount.down.sql").rename(d / "0004_entries_amount.down.sql")
    info = engine.inspect(empty_db, load(d))
    kinds = dict((x["version"], (x["kind"], x["filename"])) for x in info["drift"])
    assert kinds == {"0002": ("renamed", "0002_entry_table.sql"), "0003": ("renamed", "0004_entries_amount.sql")}
    assert info["out_of_order"] == [] and [m.version for m in info["pending"]] == []

    (d / "0002_entry_table.sql").unlink()
    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    drift = dict((x["version"], x) for x in exc.value.fields["drift"])
    assert drift["0002"]["kind"] == "missing" and drift["0002"]["recorded_checksum"] in exc.value.msg
    assert "0002" in exc.value.msg and "has no file in the set" in exc.value.msg
    # A rename is accepted like an edit (name and checksum recorded), a deletion can't be.
    with pytest.raises(LedgerError, match="has no file in the set"):
        engine.accept_checksum(empty_db, load(d), "0002")


# --------------------------------------------------------------------------- target, order, baseline

def test_target_applies_up_to_a_version_and_refuses_a_bad_one(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    res = run(empty_db, d, target="0002")
    assert [a["version"] for a in res["applied"]] == ["0001", "0002"] and res["above_target"] == ["0003"]
    assert history(empty_db) == ["0001", "0002"]
    with pytest.raises(LedgerError, match="below the applied version 0002"):
        run(empty_db, d, target="0001")
    with pytest.raises(LedgerError, match="target 0009 is not a version of the set"):
        run(empty_db, d, target="0009")
    assert history(empty_db) == ["0001", "0002"]


def test_an_out_of_order_file_is_refused_unless_allowed(tmp_path, empty_db):
    files = dict(BASIC)
    late = files.pop("0002_entries.sql")
    files.pop("0002_entries.down.sql")
    files["0003_entries_amount.sql"] = "CREATE TABLE entries (id integer, amount bigint);"
    d = write_set(tmp_path / "m", files)
    run(empty_db, d)
    write_set(d, {"0002_late.sql": late.replace("CREATE TABLE entries", "CREATE TABLE late_entries")})
    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    assert "0002_late.sql is older than the newest applied version 0003" in exc.value.msg
    assert history(empty_db) == ["0001", "0003"]
    res = run(empty_db, d, allow_out_of_order=True)
    assert [a["version"] for a in res["applied"]] == ["0002"]


def test_baseline_records_a_hand_migrated_database_without_running_files(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    # Migrated by hand with psql, as the runbook does: the objects exist, no history.
    for name in ("0001_accounts.sql", "0002_entries.sql"):
        q(empty_db, (d / name).read_text())
    ms = load(d)
    dry = engine.baseline(empty_db, ms, "0002", check=True)
    assert dry["baselined"] == ["0001", "0002"] and dry["warnings"] == []
    # 0003 was never run by hand: its file would still apply, and the baseline says so.
    wrong = engine.baseline(empty_db, ms, "0003", check=True)
    assert len(wrong["warnings"]) == 1 and wrong["warnings"][0].startswith("0003 would apply cleanly")
    assert q(empty_db, "SELECT to_regclass('migrations.history')")[0][0] is None  # check mode wrote nothing
    res = engine.baseline(empty_db, ms, "0002", run_id="base-run")
    assert res["changed"] and res["baselined"] == ["0001", "0002"]
    rows = q(empty_db, "SELECT version, kind, execution_ms, checksum FROM migrations.history ORDER BY 1")
    assert [(r[0], r[1], r[2]) for r in rows] == [("0001", "baseline", 0), ("0002", "baseline", 0)]
    assert rows[0][3] == ms[0].checksum
    assert one(empty_db, "SELECT count(*) FROM accounts") == 1  # 0001's INSERT was not run again
    assert events(empty_db, "baseline")[0][3]["versions"] == ["0001", "0002"]
    assert engine.baseline(empty_db, ms, "0002")["changed"] is False
    assert [a["version"] for a in run(empty_db, d)["applied"]] == ["0003"]
    with pytest.raises(LedgerError, match="already recorded above it"):
        engine.baseline(empty_db, ms, "0001")


# --------------------------------------------------------------------------- revert

def test_revert_runs_down_scripts_newest_first_with_their_history_rows(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d)
    check = engine.revert(empty_db, load(d), "0001", check=True)
    assert check["plan"] == ["0003", "0002"] and [r["status"] for r in check["rehearsal"]] == ["would_apply"] * 2
    assert history(empty_db) == ["0001", "0002", "0003"]
    res = engine.revert(empty_db, load(d), "0001", run_id="rev")
    assert [x["version"] for x in res["reverted"]] == ["0003", "0002"] and res["version_after"] == "0001"
    assert history(empty_db) == ["0001"] and one(empty_db, "SELECT to_regclass('public.entries') IS NULL")
    assert [(e[1], e[2]) for e in events(empty_db, "revert")] == [("0003", "ok"), ("0002", "ok")]
    engine.revert(empty_db, load(d), "base")
    assert history(empty_db) == [] and one(empty_db, "SELECT to_regclass('public.accounts') IS NULL")
    assert one(empty_db, "SELECT to_regclass('migrations.history') IS NOT NULL")  # records stay


def test_revert_refuses_before_any_change_when_a_down_script_is_missing(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d)
    (d / "0002_entries.down.sql").unlink()
    with pytest.raises(LedgerError) as exc:
        engine.revert(empty_db, load(d), "base", advice=PlaybookAdvice("testenv"))
    assert exc.value.fields["missing_down"] == ["0002"]
    assert "rollback_mode=restore" in exc.value.fields["next_command"]
    assert history(empty_db) == ["0001", "0002", "0003"]  # 0003 was not reverted first


def test_a_failing_down_script_leaves_its_migration_applied(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d)
    (d / "0003_entries_amount.down.sql").write_text("ALTER TABLE entries DROP COLUMN amount;\nSELECT 1/0;\n")
    with pytest.raises(LedgerError) as exc:
        engine.revert(empty_db, load(d), "0001")
    assert (exc.value.fields["file"], exc.value.fields["line"]) == ("0003_entries_amount.down.sql", 2)
    assert history(empty_db) == ["0001", "0002", "0003"]
    assert one(empty_db, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'amount'") == 1


def test_revert_refuses_when_an_up_file_to_revert_drifted(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d)
    # 0002's up file was edited after it was applied: its down script may not match what was applied.
    (d / "0002_entries.sql").write_text("CREATE TABLE entries (id integer PRIMARY KEY, note text);\n")
    for check in (True, False):
        with pytest.raises(LedgerError) as exc:
            engine.revert(empty_db, load(d), "0001", check=check, advice=PlaybookAdvice("testenv"))
        assert "refusing to revert" in exc.value.msg and "before any change" in exc.value.msg
        assert "0002 (0002_entries.sql) was edited" in exc.value.msg
        assert "accept_checksum.yml -l testenv -e migrate_accept_version=0002" in exc.value.fields["next_command"]
        assert [x["version"] for x in exc.value.fields["drift"]] == ["0002"]
    assert history(empty_db) == ["0001", "0002", "0003"]  # not even 0003 was reverted
    assert [e[2] for e in events(empty_db, "revert")] == ["refused"]  # the real run's refusal, not --check's
    # A drifted file that the revert doesn't touch doesn't matter; once accepted, the revert proceeds.
    assert [x["version"] for x in engine.revert(empty_db, load(d), "0002")["reverted"]] == ["0003"]
    engine.accept_checksum(empty_db, load(d), "0002")
    assert [x["version"] for x in engine.revert(empty_db, load(d), "0001")["reverted"]] == ["0002"]


def test_revert_refuses_a_version_without_down_script_found_under_the_lease(tmp_path, empty_db):
    """The plan is recomputed under the lease: a version applied meanwhile without a down script is refused."""
    d = write_set(tmp_path / "m", BASIC)
    run(empty_db, d)
    holder_conn = psycopg2.connect(empty_db)
    holder_conn.autocommit = True
    holder = engine.Lease(empty_db, holder_conn, "other-run", ttl=30).acquire()
    box = {}

    def go():
        try:
            box["result"] = engine.revert(empty_db, load(d), "0002", run_id="rev", lock_wait=20, advice=PlaybookAdvice("testenv"))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not q(empty_db, "SELECT 1 FROM migrations.events WHERE action = 'lock_wait' AND run_id = 'rev'"):
        assert time.monotonic() < deadline, "the revert never waited for the lease"
        time.sleep(0.05)
    # While the revert waits, the other run applies a 0004 this set has no down script for.
    q(empty_db, "CREATE TABLE extra (i int)")
    q(empty_db, "INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
                " VALUES ('0004', 'extra', repeat('a', 64), 'someone', 1, 'other-run')")
    holder.release()
    holder_conn.close()
    t.join(20)
    assert "result" not in box, box.get("result")
    err = box["error"]
    assert isinstance(err, LedgerError), repr(err)  # not a TypeError on the missing down script
    assert err.fields["missing_down"] == ["0004"] and "found under the lease" in err.msg
    assert history(empty_db) == ["0001", "0002", "0003", "0004"]  # nothing reverted
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0


# --------------------------------------------------------------------------- session-level settings


def test_transaction_scoped_settings_are_accepted(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_a.sql": """
            SET LOCAL search_path = public;
            SET CONSTRAINTS ALL DEFERRED;
            SELECT set_config('app.x', 'y, z', true);
            CREATE TABLE t (i int, note text DEFAULT 'SET x = 1; RESET ALL');
            CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
                AS $$ BEGIN PERFORM set_config('app.y', '1', false); END $$;
            UPDATE t SET i = 1;
        """,
        "0002_idx.sql": """
            -- ledger:no-transaction
            SET maintenance_work_mem = '70MB';
            CREATE INDEX CONCURRENTLY IF NOT EXISTS t_i_idx ON t (i);
        """,
        "0003_after.sql": "CREATE TABLE seen AS SELECT current_setting('search_path') AS sp,"
                          " current_setting('app.x', true) AS x;",
    })
    res = run(empty_db, d)
    assert [a["version"] for a in res["applied"]] == ["0001", "0002", "0003"]
    # SET LOCAL / set_config(..., true) ended with 0001's transaction.
    assert q(empty_db, "SELECT sp, coalesce(x, '') FROM seen") == [('"$user", public', "")]


# --------------------------------------------------------------------------- non-transactional migrations

NONTX = {
    "0001_t.sql": """
        CREATE TABLE t (a int, b int);
        INSERT INTO t SELECT g, g % 3 FROM generate_series(1, 30) g;
    """,
    "0002_t_indexes.sql": """
        -- Indexes built without blocking writes: this file runs outside a transaction.
        -- ledger:no-transaction
        CREATE INDEX CONCURRENTLY IF NOT EXISTS t_a_idx ON t (a);

        CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_b_key
            ON t (b);
    """,
}


def test_a_non_transactional_migration_failing_half_way_reports_the_invalid_index(tmp_path, empty_db):
    d = write_set(tmp_path / "m", NONTX)
    # The rehearsal runs CONCURRENTLY as a plain CREATE INDEX and catches the duplicate.
    run(empty_db, d, target="0001")
    results = engine.rehearse(empty_db, engine.inspect(empty_db, load(d))["pending"])
    assert results[0]["status"] == "would_fail" and results[0]["sqlstate"] == "23505" and results[0]["line"] == 5
    assert one(empty_db, "SELECT to_regclass('public.t_a_idx') IS NULL")

    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    f = exc.value.fields
    assert (f["sqlstate"], f["file"], f["line"]) == ("23505", "0002_t_indexes.sql", 5)
    assert f["statements_applied"] == [3]
    assert [i["index"] for i in f["invalid_indexes"]] == ["t_b_key"]
    assert f["cleanup_sql"] == "DROP INDEX CONCURRENTLY IF EXISTS public.t_b_key;"
    assert "INVALID" in exc.value.msg and "DROP INDEX CONCURRENTLY IF EXISTS public.t_b_key;" in exc.value.msg
    assert history(empty_db) == ["0001"]
    assert one(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_b_key'::regclass") is False

    # A re-run over the INVALID index is refused (IF NOT EXISTS would skip it silently).
    q(empty_db, "DELETE FROM t WHERE a > 3")
    with pytest.raises(LedgerError) as exc:
        run(empty_db, d)
    assert "INVALID index(es) named in the file exist" in exc.value.msg
    q(empty_db, f["cleanup_sql"])
    res = run(empty_db, d)
    assert res["applied"][0]["transactional"] is False and history(empty_db) == ["0001", "0002"]
    assert one(empty_db, "SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 't'::regclass")


# --------------------------------------------------------------------------- status

def test_status_lists_applied_pending_and_drift(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    st = engine.status(empty_db, load(d))
    assert st["records"] is False and [p["version"] for p in st["pending"]] == ["0001", "0002", "0003"]
    run(empty_db, d, target="0001")
    (d / "0001_accounts.sql").write_text("-- changed\n" + (d / "0001_accounts.sql").read_text())
    st = engine.status(empty_db, load(d))
    assert st["applied"][0]["version"] == "0001" and st["applied"][0]["applied_by"]
    assert [p["version"] for p in st["pending"]] == ["0002", "0003"]
    assert st["drift"][0]["kind"] == "edited"
    text = "\n".join(st["lines"])
    assert "applied  0001 accounts" in text and "pending  0002_entries.sql" in text and "DRIFT    0001 edited" in text
