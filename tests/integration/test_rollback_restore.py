"""Restore of a verified backup (ledger_rollback mode=restore) against a real PostgreSQL 15.

The strategy under test: restore into a new database, check it, swap the names in one
transaction, keep the old database as <db>_pre_restore_<ts>. Every failure before the swap
must leave the target exactly as it was (schema, rows, history) and no stray database.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time
from pathlib import Path

import psycopg2
import psycopg2.extras
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, ensure_records
from pghelpers import history, load_module, other_sessions, q
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = RUNBOOK_SET  # the runbook's 0008-0011, whatever else files/migrations holds



rollback = load_module("ledger_rollback")
backup = load_module("ledger_backup")
verify = load_module("ledger_verify")


# --------------------------------------------------------------------------- helpers


def record_history(url, versions=("0008", "0009", "0010", "0011")):
    """The records of CONTRACT.md for a database whose files were applied by conftest (no engine)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            ensure_records(cur)
            for v in versions:
                path = next(MIGRATIONS.glob(v + "_*.sql"))
                cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
                            " VALUES (%s, %s, %s, 'test', 1, 'test-run')",
                            (v, path.name[5:-4], hashlib.sha256(path.read_bytes()).hexdigest()))
    finally:
        conn.close()



def schema_dump(cluster, url):
    res = subprocess.run([cluster.bin("pg_dump"), "--schema-only", "-d", url],
                         capture_output=True, text=True, check=True)
    # pg_dump 15.14+ brackets its output with \restrict <random key>: not part of the schema.
    return "\n".join(line for line in res.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def revert_0011(url):
    """Change the target after the backup the way a revert would (independently of the module under test)."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(next(MIGRATIONS.glob("0011_*.down.sql")).read_text())
            cur.execute("DELETE FROM migrations.history WHERE version = '0011'")
    finally:
        conn.close()


def databases(cluster, like):
    return sorted(r[0] for r in q(cluster.url(), "SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)))


@pytest.fixture
def target(pg_cluster, ledger_db, tmp_path):
    """A target at 0011 with its records, one ledger row and a verified backup; yields a namespace."""
    record_history(ledger_db)
    q(ledger_db, "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                 " VALUES ('11111111-1111-1111-1111-111111111111', 'seed', 1000000)")
    dbname = ledger_db.rsplit("/", 1)[1]

    class T:
        url = ledger_db
        name = dbname
        backup_dir = tmp_path / "backups"
        cluster = pg_cluster

        @staticmethod
        def take_backup():
            return backup.run_backup({"database_url": ledger_db, "backup_dir": str(tmp_path / "backups"),
                                      "retention": 0, "run_id": "test-backup"})

        @staticmethod
        def restore(check_mode=False, **params):
            args = {"database_url": ledger_db, "mode": "restore", "backup_dir": str(tmp_path / "backups"),
                    "run_id": "test-restore", "host_label": "testhost"}
            args.update(params)
            return rollback.run(args, check_mode=check_mode)

    try:
        yield T
    finally:
        for name in databases(pg_cluster, dbname + "\\_%restore\\_%"):
            pg_cluster.drop_db(name)


def structure_failures(url):
    """The verify stage's catalog checks: migrations.history agrees with the objects present (and absent)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            exp = verify.Expectations.load()  # this collection's files/migrations/*.verify.json
            applied, source = verify.applied_versions(cur, exp)
            assert source == "history"
            report = verify.Report(exp)
            verify.check_structure(cur, report, applied, source, "arrakis_app", exp)
            assert report.checks
            return report.failed()
    finally:
        conn.rollback()
        conn.close()


def assert_unchanged(t, schema_before, history_before):
    assert schema_dump(t.cluster, t.url) == schema_before
    assert history(t.url) == history_before
    assert q(t.url, "SELECT count(*) FROM public.credit_lots")[0][0] == 1
    # No partial copy left behind, and nothing renamed.
    assert databases(t.cluster, t.name + "\\_%restore\\_%") == []


# --------------------------------------------------------------------------- success

def test_restore_brings_back_the_schema_rows_and_history_of_backup_time(target):
    taken = target.take_backup()
    schema_at_backup = schema_dump(target.cluster, target.url)
    oid_before = q(target.cluster.url(), "SELECT oid FROM pg_database WHERE datname = %s", (target.name,))[0][0]
    revert_0011(target.url)
    assert schema_dump(target.cluster, target.url) != schema_at_backup

    result = target.restore()

    assert result["changed"] is True
    assert result["backup_file"] == taken["backup_file"]
    assert schema_dump(target.cluster, target.url) == schema_at_backup
    assert history(target.url) == ["0008", "0009", "0010", "0011"]
    assert structure_failures(target.url) == []
    assert q(target.url, "SELECT count(*) FROM public.credit_lots")[0][0] == 1
    # The restore is in the restored database's events log, naming the backup and where the old one went.
    events = q(target.url, "SELECT outcome, detail FROM migrations.events WHERE action = 'restore'")
    assert len(events) == 1 and events[0][0] == "ok"
    assert events[0][1]["backup_file"] == taken["backup_file"]
    assert events[0][1]["previous_database"] == result["previous_database"]
    # The database as it was is kept under its new name, with the revert it had undergone.
    assert result["previous_database"].startswith(target.name + "_pre_restore_")
    assert history(target.cluster.url(result["previous_database"])) == ["0008", "0009", "0010"]
    oid_after = q(target.cluster.url(), "SELECT oid FROM pg_database WHERE datname = %s", (target.name,))[0][0]
    assert oid_after != oid_before
    assert "DROP DATABASE" in result["msg"] and result["previous_database"] in result["msg"]
    # Its drop command comes after what dropping it loses.
    assert ("the database as it was is kept as %s: it holds the rows written to %s after this backup was taken, "
            "which no other database holds: dropping it loses them; drop it only once none of them is wanted: %s"
            % (result["previous_database"], target.name, result["drop_previous"])) in result["msg"]


def test_restore_keeps_database_grants_and_settings(target):
    q(target.url, "REVOKE CONNECT, TEMPORARY ON DATABASE \"%s\" FROM PUBLIC" % target.name)
    q(target.url, "GRANT CONNECT ON DATABASE \"%s\" TO arrakis_app" % target.name)
    q(target.url, "ALTER DATABASE \"%s\" SET work_mem = '8MB'" % target.name)
    q(target.url, "ALTER DATABASE \"%s\" SET search_path = app, \"$user\", public" % target.name)
    before = q(target.cluster.url(), "SELECT datacl::text, (SELECT setconfig::text FROM pg_db_role_setting s"
                                     " WHERE s.setdatabase = d.oid AND s.setrole = 0) FROM pg_database d"
                                     " WHERE datname = %s", (target.name,))
    target.take_backup()
    target.restore()
    after = q(target.cluster.url(), "SELECT datacl::text, (SELECT setconfig::text FROM pg_db_role_setting s"
                                    " WHERE s.setdatabase = d.oid AND s.setrole = 0) FROM pg_database d"
                                    " WHERE datname = %s", (target.name,))
    assert after == before


def test_restore_of_an_explicit_backup_file(target):
    first = target.take_backup()
    revert_0011(target.url)
    target.take_backup()  # newer, at 0010: the explicit file must win over it
    result = target.restore(backup_file=first["backup_file"], backup_dir=None)
    assert result["backup_file"] == first["backup_file"]
    assert history(target.url) == ["0008", "0009", "0010", "0011"]


def test_check_mode_changes_nothing_and_says_what_it_would_do(target):
    taken = target.take_backup()
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)
    result = target.restore(check_mode=True)
    assert result["msg"].startswith("would restore " + taken["backup_file"])
    assert_unchanged(target, schema_before, ["0008", "0009", "0010"])
    assert q(target.url, "SELECT count(*) FROM migrations.events WHERE action = 'restore'")[0][0] == 0


# --------------------------------------------------------------------------- refusals before anything is touched

def test_checksum_mismatch_is_refused_before_anything_is_dropped(target):
    taken = target.take_backup()
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)
    data = bytearray(Path(taken["backup_file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(taken["backup_file"]).write_bytes(bytes(data))

    with pytest.raises(LedgerError) as err:
        target.restore()
    assert "does not match its manifest" in err.value.msg
    assert_unchanged(target, schema_before, ["0008", "0009", "0010"])


def test_truncated_dump_with_a_rewritten_manifest_is_refused_before_anything_is_dropped(target):
    """The sha256 matches (the manifest was rewritten), but the full read catches the truncation."""
    taken = target.take_backup()
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)
    path = Path(taken["backup_file"])
    data = path.read_bytes()[: path.stat().st_size * 2 // 3]
    path.write_bytes(data)
    manifest = json.loads(Path(taken["manifest"]).read_text())
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    Path(taken["manifest"]).write_text(json.dumps(manifest))

    with pytest.raises(LedgerError) as err:
        target.restore()
    assert "can't be read in full" in err.value.msg
    assert_unchanged(target, schema_before, ["0008", "0009", "0010"])


def test_unverified_or_foreign_backups_are_refused(target, tmp_path):
    taken = target.take_backup()
    manifest = json.loads(Path(taken["manifest"]).read_text())
    Path(taken["manifest"]).write_text(json.dumps(dict(manifest, verified=False)))
    with pytest.raises(LedgerError) as err:
        target.restore()
    assert "no verified backup" in err.value.msg
    with pytest.raises(LedgerError) as err:
        target.restore(backup_file=taken["backup_file"])
    assert "failed its verification" in err.value.msg
    # Another server (its system_identifier) or another database of this one: not this target, whatever the
    # slug says; never picked as "the newest", and refused as backup_file without the override.
    for foreign in (dict(manifest, system_identifier="1234"), dict(manifest, database="another_ledger")):
        Path(taken["manifest"]).write_text(json.dumps(foreign))
        with pytest.raises(LedgerError) as err:
            target.restore()
        assert "no verified backup" in err.value.msg
        with pytest.raises(LedgerError) as err:
            target.restore(backup_file=taken["backup_file"])
        assert "not restored over another database" in err.value.msg
        assert "-e rollback_backup_other_target=true" in err.value.msg
        assert err.value.fields["refused"] == "other_target"
    # A manifest written before identities were recorded: the host-port-db slug decides.
    old = dict((k, v) for k, v in manifest.items() if k != "system_identifier")
    Path(taken["manifest"]).write_text(json.dumps(dict(old, target_slug="elsewhere-5432-ledger")))
    with pytest.raises(LedgerError) as err:
        target.restore(backup_file=taken["backup_file"])
    assert "not restored over another database" in err.value.msg
    Path(taken["manifest"]).write_text(json.dumps(old))
    assert target.restore(check_mode=True)["backup_file"] == taken["backup_file"]


def test_a_backup_taken_through_another_hostname_is_of_this_target(target, tmp_path):
    """localhost and 127.0.0.1 reach the same server: the manifest's system_identifier and database say so."""
    via_localhost = target.url.replace("@127.0.0.1:", "@localhost:")
    taken = backup.run_backup({"database_url": via_localhost, "backup_dir": str(target.backup_dir),
                               "retention": 0, "run_id": "test-backup"})
    manifest = json.loads(Path(taken["manifest"]).read_text())
    assert manifest["target_slug"].startswith("localhost-")
    assert manifest["system_identifier"] and manifest["database"] == target.name
    revert_0011(target.url)
    result = target.restore()
    assert result["backup_file"] == taken["backup_file"] and result["other_target"] is False
    assert history(target.url) == ["0008", "0009", "0010", "0011"]


def test_a_backup_of_another_target_is_restored_only_when_asked(target):
    taken = target.take_backup()
    revert_0011(target.url)
    manifest = json.loads(Path(taken["manifest"]).read_text())
    Path(taken["manifest"]).write_text(json.dumps(dict(manifest, system_identifier="1234")))
    result = target.restore(backup_file=taken["backup_file"], backup_other_target=True)
    assert result["other_target"] is True and result["backup_system_identifier"] == "1234"
    assert history(target.url) == ["0008", "0009", "0010", "0011"]


def test_the_copy_is_checked_against_the_row_counts_of_a_read_verified_backup(target):
    """backup_verify=read (the default) still records exact counts; a copy that differs is never swapped in."""
    taken = target.take_backup()
    manifest = json.loads(Path(taken["manifest"]).read_text())
    assert "scratch database" not in manifest["verify_method"]
    assert manifest["row_counts"]["public.credit_lots"] == 1
    assert manifest["row_counts_method"] == "count(*) in the dump's snapshot"
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)
    counts = dict(manifest["row_counts"], **{"public.credit_lots": 2})
    Path(taken["manifest"]).write_text(json.dumps(dict(manifest, row_counts=counts)))
    with pytest.raises(LedgerError) as err:
        target.restore()
    assert "public.credit_lots has 1 rows, the manifest 2" in err.value.msg
    assert_unchanged(target, schema_before, ["0008", "0009", "0010"])


def test_room_for_the_copy_is_checked_and_kept_copies_are_named_with_a_drop_command(target):
    target.take_backup()
    revert_0011(target.url)
    plan = target.restore(check_mode=True)
    space = plan["space"]
    assert space["free_bytes"] > 0 and space["path"]
    assert space["needed_bytes"] == int(plan["database_size_bytes"] * 1.2)
    assert "the copy needs about" in plan["msg"] and "free" in plan["msg"]

    result = target.restore()
    # The kept database's drop command names host, port, user and databases: no URL.
    assert "postgresql://" not in result["msg"] and "postgresql://" not in result["drop_previous"]
    assert result["drop_previous"] in result["msg"]

    # Not enough room (a margin no disk satisfies): refused before the copy, naming the copies kept so far.
    schema_before = schema_dump(target.cluster, target.url)
    with pytest.raises(LedgerError) as err:
        target.restore(restore_space_margin=1e9)
    msg = err.value.msg
    assert "refusing to restore" in msg and "the copy needs about" in msg and "Nothing was changed" in msg
    assert result["previous_database"] in msg and result["drop_previous"] in msg
    assert ("Each is kept on purpose: it holds the rows written to %s after the backup its restore used, which no "
            "other database holds: dropping it loses them. Drop those whose rows are no longer wanted, one by one, e.g.: "
            "%s; or every kept database of %s at once: ansible-playbook playbooks/rollback.yml -l testhost -e rollback_drop_kept=true"
            % (target.name, result["drop_previous"], target.name)) in msg
    assert err.value.fields["refused"] == "space"
    assert schema_dump(target.cluster, target.url) == schema_before
    assert databases(target.cluster, target.name + "\\_restore\\_%") == []

    # The command works as printed.
    argv = shlex.split(result["drop_previous"])
    assert argv[0] == "psql"
    subprocess.run([target.cluster.bin("psql")] + argv[1:], check=True, capture_output=True)
    assert databases(target.cluster, target.name + "\\_pre\\_restore\\_%") == []


def test_a_replication_sender_refuses_the_restore_and_is_never_terminated(target):
    target.take_backup()
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)
    sender = psycopg2.connect(target.url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        pid = q(target.cluster.url(), "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'"
                                      " AND datname = %s", (target.name,))[0][0]
        with pytest.raises(LedgerError) as err:
            target.restore(terminate_connections=True)
        assert "pid %d" % pid in err.value.msg and "walsender" in err.value.msg
        assert err.value.fields["refused"] == "server_processes"
        assert_unchanged(target, schema_before, ["0008", "0009", "0010"])
        assert q(target.cluster.url(), "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))[0][0] == 1
    finally:
        sender.close()
    deadline = time.time() + 10
    while q(target.cluster.url(), "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))[0][0]:
        assert time.time() < deadline
        time.sleep(0.05)
    assert target.restore()["changed"] is True


def test_connected_sessions_refuse_the_restore_unless_terminated(target):
    target.take_backup()
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)
    app = psycopg2.connect(target.cluster.url(target.name, user="postgres"), application_name="ledger-app")
    try:
        with app.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        app.commit()
        # Only the application's session: the test's own closed connections have ended.
        assert other_sessions(target.url, keep=[pid]) == []
        with pytest.raises(LedgerError) as err:
            target.restore()
        assert "pid %d" % pid in err.value.msg and "ledger-app" in err.value.msg
        assert "rollback_terminate_connections=true" in err.value.msg
        assert_unchanged(target, schema_before, ["0008", "0009", "0010"])

        assert other_sessions(target.url, keep=[pid]) == []
        result = target.restore(terminate_connections=True)
        assert [s["pid"] for s in result["terminated"]] == [pid]
        assert history(target.url) == ["0008", "0009", "0010", "0011"]
        with pytest.raises(psycopg2.Error):
            with app.cursor() as cur:
                cur.execute("SELECT 1")
        # The kept database accepts connections (nothing closes it to new ones: the swap is one transaction).
        assert history(target.cluster.url(result["previous_database"])) == ["0008", "0009", "0010"]
    finally:
        app.close()


# --------------------------------------------------------------------------- failure half-way

def test_restore_failing_half_way_leaves_the_database_unchanged(target):
    """The dump restores its tables and rows, then fails on a GRANT to a role that no longer exists."""
    q(target.url, "DROP ROLE IF EXISTS ledger_rb_gone")
    q(target.url, "CREATE ROLE ledger_rb_gone")
    try:
        q(target.url, "GRANT SELECT ON public.credit_lots TO ledger_rb_gone")
        target.take_backup()
        q(target.url, "REVOKE SELECT ON public.credit_lots FROM ledger_rb_gone")
    finally:
        q(target.url, "DROP ROLE ledger_rb_gone")
    revert_0011(target.url)
    schema_before = schema_dump(target.cluster, target.url)

    with pytest.raises(LedgerError) as err:
        target.restore()
    msg = err.value.msg
    assert "failed half-way" in msg and "ledger_rb_gone" in msg and "is unchanged" in msg
    assert_unchanged(target, schema_before, ["0008", "0009", "0010"])
    # The failure is recorded on the target (its events log already existed).
    row = q(target.url, "SELECT outcome, detail->>'error' FROM migrations.events WHERE action = 'restore'")
    assert row and row[0][0] == "failed" and "half-way" in row[0][1]


def test_maintenance_database_must_differ_from_the_target(target):
    with pytest.raises(LedgerError) as err:
        target.restore(maintenance_db=target.name)
    assert "maintenance database" in err.value.msg
