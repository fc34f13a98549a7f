"""The precheck module on a real PostgreSQL 15: every refusal of the checklist, and that a refused
run changes nothing.

The module is driven through its Python entry point `run_precheck(params, check_mode)` (the same
function AnsibleModule calls); tests/test_precheck_playbook.py runs it through ansible-playbook.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
from pghelpers import events, load_module
from ledgertest import RUNBOOK_SET



ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = RUNBOOK_SET  # the runbook's 0008-0011, whatever else files/migrations holds


precheck = load_module("ledger_precheck", prefix="")


def run(url, check_mode=False, **params):
    params.setdefault("migrations_dir", None)  # the migration checks have their own tests
    return precheck.run_precheck(dict(database_url=url, run_id="test-" + uuid.uuid4().hex[:6], **params),
                                 check_mode=check_mode)


def by_name(result):
    return {c["name"]: c for c in result["checks"]}


def schema_exists(url, schema="migrations"):
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
            return cur.fetchone()[0]
    finally:
        conn.close()



@pytest.fixture
def session(empty_db):
    """Open extra sessions on the database under test; all closed afterwards."""
    conns = []

    def open_session(autocommit=True):
        conn = psycopg2.connect(empty_db)
        conn.autocommit = autocommit
        conns.append(conn)
        return conn

    yield open_session
    for conn in conns:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def pid_of(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


# --------------------------------------------------------------------------- the healthy case

def test_every_check_is_reported_with_value_and_threshold(empty_db, tmp_path):
    result = run(empty_db, backup_dir=str(tmp_path / "backups"))
    assert not result["failed"], result["msg"]
    names = [c["name"] for c in result["checks"]]
    for expected in ("server_version", "backup_privilege", "app_role_login", "required_roles", "connections",
                     "pgbouncer", "long_running_queries", "idle_in_transaction", "lock_waits", "replication_lag",
                     "replication_slots", "backup_dir", "maintenance_window", "migration_set"):
        assert expected in names
    for c in result["checks"]:
        assert set(c) >= {"name", "passed", "observed", "threshold", "offenders"}
    checks = by_name(result)
    assert checks["server_version"]["observed"]["major"] == 15
    assert checks["replication_lag"]["message"] == "no replicas"
    # Nothing pending (no migration set given): the backup directory is checked but not created.
    assert checks["backup_dir"]["observed"]["would_create"]
    assert not (tmp_path / "backups").exists()
    assert result["changed"] is False


def test_wrong_major_version_refused(empty_db):
    result = run(empty_db, accepted_versions=[16, 17])
    assert result["failed"] and result["failed_checks"] == ["server_version"]
    assert "not one of [16, 17]" in result["msg"]


# --------------------------------------------------------------------------- sessions

def test_long_running_query_refused_with_the_offender_named(empty_db, session):
    busy = session()
    pid = pid_of(busy)
    worker = threading.Thread(target=lambda: _swallow(busy, "SELECT pg_sleep(20) /* long report */"))
    worker.start()
    try:
        time.sleep(1.5)
        result = run(empty_db, long_tx_seconds=1)
        assert result["failed_checks"] == ["long_running_queries"], result["msg"]
        offender = by_name(result)["long_running_queries"]["offenders"][0]
        assert offender["pid"] == pid and offender["user"] == "postgres"
        assert offender["age_s"] >= 1 and offender["query"].startswith("SELECT pg_sleep(20)")
        assert len(offender["query"]) <= 80
        assert "pid %d" % pid in result["msg"] and "next:" in result["msg"]
        # Under the default threshold (300 s) the same session is fine.
        assert not run(empty_db)["failed"]
    finally:
        _cancel(empty_db, pid)
        worker.join()


def _swallow(conn, sql):
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    except psycopg2.Error:
        pass


def _cancel(url, pid):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_cancel_backend(%s)", (pid,))
    conn.close()


def test_idle_in_transaction_refused_and_nothing_changed(empty_db, session, tmp_path):
    idle = session(autocommit=False)
    with idle.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_class")  # opens the transaction, then sits idle in it
    pid = pid_of(idle)
    time.sleep(1.3)
    backups = tmp_path / "backups"
    result = run(empty_db, long_tx_seconds=1, backup_dir=str(backups), migrations_dir=str(MIGRATIONS),
                 rehearse=False)
    checks = by_name(result)
    assert "idle_in_transaction" in result["failed_checks"], result["msg"]
    assert checks["idle_in_transaction"]["offenders"][0]["pid"] == pid
    assert checks["idle_in_transaction"]["threshold"] == {"max_age_s": 1}
    assert "pg_terminate_backend(%d)" % pid in result["msg"]
    # A refused run changed nothing: no backup directory, no records schema, no event.
    assert result["changed"] is False
    assert not backups.exists()
    assert not schema_exists(empty_db)
    assert events(empty_db) == []


def test_too_many_connections_refused(empty_db, session):
    baseline = by_name(run(empty_db))["connections"]["observed"]["client_connections"]
    threshold = baseline + 3
    assert not run(empty_db, max_connections=threshold)["failed"]
    for _ in range(4):
        session()
    result = run(empty_db, max_connections=threshold)
    assert result["failed_checks"] == ["connections"], result["msg"]
    conn_check = by_name(result)["connections"]
    assert conn_check["observed"]["client_connections"] >= threshold
    assert conn_check["threshold"] == {"below": threshold}
    assert sum(g["count"] for g in conn_check["offenders"]) >= 4


def test_default_connection_threshold_is_80_percent_of_max_connections(empty_db):
    check = by_name(run(empty_db))["connections"]
    assert check["threshold"]["below"] == int(check["observed"]["server_max_connections"] * 0.8)


def test_queued_lock_wait_on_a_watched_table_refused(empty_db, session):
    holder = session(autocommit=False)
    with holder.cursor() as cur:
        cur.execute("CREATE TABLE public.lock_probe (id int)")
    holder.commit()
    with holder.cursor() as cur:
        cur.execute("SELECT * FROM public.lock_probe")  # holds ACCESS SHARE
    waiter = session()
    waiter_pid = pid_of(waiter)
    worker = threading.Thread(target=lambda: _swallow(
        waiter, "BEGIN; LOCK TABLE public.lock_probe IN ACCESS EXCLUSIVE MODE; ROLLBACK"))
    worker.start()
    try:
        time.sleep(0.8)
        result = run(empty_db)
        assert result["failed_checks"] == ["lock_waits"], result["msg"]
        offender = by_name(result)["lock_waits"]["offenders"][0]
        assert offender["pid"] == waiter_pid
        assert offender["waits_for"] == "AccessExclusiveLock on public.lock_probe"
        assert offender["blocked_by"] == [pid_of(holder)]
        # Outside the watched schemas and tables, the same wait is not this run's business.
        assert not run(empty_db, lock_schemas=["app"])["failed"]
        assert run(empty_db, lock_schemas=["app"], lock_tables=["public.lock_probe"])["failed"]
    finally:
        holder.rollback()
        worker.join()


# --------------------------------------------------------------------------- roles

@pytest.fixture
def throwaway_role(pg_cluster):
    name = "precheck_tmp_" + uuid.uuid4().hex[:8]
    conn = pg_cluster.connect()
    with conn.cursor() as cur:
        cur.execute(f'CREATE ROLE "{name}"')
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP ROLE IF EXISTS "{name}"')
        conn.close()


def test_missing_required_role_refused(empty_db, pg_cluster, throwaway_role):
    required = ["arrakis_app", "arrakis_admin", throwaway_role]
    assert not run(empty_db, required_roles=required)["failed"]
    conn = pg_cluster.connect()
    with conn.cursor() as cur:
        cur.execute(f'DROP ROLE "{throwaway_role}"')
    conn.close()
    result = run(empty_db, required_roles=required)
    assert result["failed_checks"] == ["required_roles"]
    assert by_name(result)["required_roles"]["observed"]["missing"] == [throwaway_role]
    assert f"CREATE ROLE {throwaway_role}" in result["msg"]


def test_app_role_without_login_refused(empty_db, pg_cluster):
    conn = pg_cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("ALTER ROLE arrakis_app NOLOGIN")
        result = run(empty_db)
        assert result["failed_checks"] == ["app_role_login"]
        assert by_name(result)["app_role_login"]["observed"] == {"role": "arrakis_app", "exists": True,
                                                                 "login": False}
        assert "ALTER ROLE arrakis_app LOGIN" in result["msg"]
    finally:
        with conn.cursor() as cur:
            cur.execute("ALTER ROLE arrakis_app LOGIN")
        conn.close()
    assert not run(empty_db)["failed"]


def test_role_without_bypassrls_cannot_take_the_backup(empty_db, pg_cluster, throwaway_role):
    conn = pg_cluster.connect()
    with conn.cursor() as cur:
        cur.execute(f'ALTER ROLE "{throwaway_role}" LOGIN')
    conn.close()
    result = run(pg_cluster.url(empty_db.rsplit("/", 1)[1], user=throwaway_role))
    assert "backup_privilege" in result["failed_checks"]
    assert "neither superuser nor BYPASSRLS" in by_name(result)["backup_privilege"]["message"]


# --------------------------------------------------------------------------- replication

def test_inactive_replication_slot_refused(empty_db, pg_cluster):
    slot = "precheck_probe_" + uuid.uuid4().hex[:6]
    conn = pg_cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        result = run(empty_db)
        assert result["failed_checks"] == ["replication_slots"]
        offender = by_name(result)["replication_slots"]["offenders"][0]
        assert offender["slot_name"] == slot and offender["retained_wal_bytes"] >= 0
        assert "pg_drop_replication_slot('%s')" % slot in result["msg"]
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.close()


# --------------------------------------------------------------------------- backup directory

def test_world_readable_backup_dir_refused(empty_db, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o755)
    os.chmod(backups, 0o755)
    result = run(empty_db, backup_dir=str(backups))
    assert result["failed_checks"] == ["backup_dir"]
    assert "chmod 0700 %s" % backups in result["msg"]
    os.chmod(backups, 0o700)
    assert not run(empty_db, backup_dir=str(backups))["failed"]


def _make_unwritable(path):
    """A directory this process cannot write to, even as root (chattr +i); None when impossible."""
    path.mkdir(mode=0o700)
    if os.geteuid() != 0:
        os.chmod(path, 0o500)
        return lambda: os.chmod(path, 0o700)
    res = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if res.returncode != 0:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=False)


def test_unwritable_backup_dir_refused(empty_db, tmp_path):
    backups = tmp_path / "backups"
    undo = _make_unwritable(backups)
    if undo is None:
        # No way to make an unwritable directory as root here: one that cannot be created.
        backups = Path("/proc/ledger-precheck-backups")
    try:
        result = run(empty_db, backup_dir=str(backups))
        assert result["failed_checks"] == ["backup_dir"], result["msg"]
        assert "not writable" in result["msg"] or "cannot be created" in result["msg"]
    finally:
        if undo:
            undo()


def test_backup_dir_without_room_for_the_dump_refused(empty_db, tmp_path):
    result = run(empty_db, backup_dir=str(tmp_path), backup_space_margin=1e9)
    assert result["failed_checks"] == ["backup_dir"]
    assert "the backup needs about" in result["msg"]


# --------------------------------------------------------------------------- maintenance window

def test_production_requires_acknowledgement(empty_db):
    result = run(empty_db, environment="production")
    assert result["failed_checks"] == ["maintenance_window"]
    assert "-e maintenance_window_ack=true" in result["msg"]
    assert not run(empty_db, environment="production", maintenance_window_ack=True)["failed"]
    assert not run(empty_db, environment="staging")["failed"]
    assert not run(empty_db, environment="local")["failed"]


def test_production_with_a_window_that_contains_now(empty_db):
    now = datetime.datetime.now(datetime.timezone.utc)
    inside = {"start": (now - datetime.timedelta(minutes=30)).strftime("%H:%M"),
              "end": (now + datetime.timedelta(minutes=30)).strftime("%H:%M"), "timezone": "UTC"}
    outside = {"start": (now + datetime.timedelta(hours=2)).strftime("%H:%M"),
               "end": (now + datetime.timedelta(hours=3)).strftime("%H:%M"), "timezone": "UTC"}
    assert not run(empty_db, environment="production", maintenance_window=inside)["failed"]
    result = run(empty_db, environment="production", maintenance_window=outside)
    assert result["failed_checks"] == ["maintenance_window"] and "outside the configured window" in result["msg"]


# --------------------------------------------------------------------------- the opt-in remedy

def test_terminate_idle_sessions_is_opt_in_and_lists_each(empty_db, session):
    idle = session()
    with idle.cursor() as cur:
        cur.execute("SELECT 1")
    pid = pid_of(idle)
    time.sleep(1.5)
    assert run(empty_db)["terminated"] == []  # never by default
    dry = run(empty_db, check_mode=True, terminate_idle_minutes=0.02)
    assert [t["pid"] for t in dry["terminated"]] == [pid] and dry["terminated"][0]["terminated"] is False
    assert dry["changed"] is False
    result = run(empty_db, terminate_idle_minutes=0.02)
    assert not result["failed"], result["msg"]
    assert [(t["pid"], t["terminated"]) for t in result["terminated"]] == [(pid, True)]
    assert result["changed"] is True
    with pytest.raises(psycopg2.OperationalError):
        with idle.cursor() as cur:
            cur.execute("SELECT 1")


def test_terminate_idle_does_nothing_when_the_run_is_refused_anyway(empty_db, session):
    idle = session()
    with idle.cursor() as cur:
        cur.execute("SELECT 1")
    time.sleep(1.5)
    result = run(empty_db, terminate_idle_minutes=0.02, environment="production")
    assert result["failed_checks"] == ["maintenance_window"]
    assert result["terminated"] == [] and result["changed"] is False
    with idle.cursor() as cur:
        cur.execute("SELECT 1")  # still alive


# --------------------------------------------------------------------------- the migration set (the engine)

def _record_applied(url, versions, checksum=None):
    """History rows as the engine writes them, without running the files."""
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import ensure_records

    by_version = ledger_engine.load_migration_set(str(MIGRATIONS)).by_version()
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        ensure_records(cur)
        for v in versions:
            m = by_version[v]
            cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
                        " VALUES (%s, %s, %s, 'test', 1, 'test')", (v, m.name, checksum or m.checksum))
    conn.close()


def test_pending_migrations_are_rehearsed_and_reported(empty_db, tmp_path):
    backups = tmp_path / "backups"
    result = run(empty_db, migrations_dir=str(MIGRATIONS), backup_dir=str(backups))
    assert not result["failed"], result["msg"]
    assert result["pending"] == ["0008", "0009", "0010", "0011"] and result["schema_version"] is None
    rehearsal = by_name(result)["rehearsal"]
    assert rehearsal["passed"] and rehearsal["observed"]["would_apply"] == 4
    # The rehearsal was rolled back: none of the ledger exists.
    assert not schema_exists(empty_db, "app")
    # Something is pending: the backup directory is created 0700 for the backup stage, and the run recorded.
    assert result["changed"] and result["backup_dir_created"]
    assert oct(backups.stat().st_mode & 0o777) == "0o700"
    assert [(a, o) for a, o, _ in events(empty_db)] == [("rehearse", "ok"), ("precheck", "passed")]


def test_check_mode_runs_every_check_and_writes_nothing(empty_db, tmp_path):
    backups = tmp_path / "backups"
    result = run(empty_db, check_mode=True, migrations_dir=str(MIGRATIONS), backup_dir=str(backups))
    assert not result["failed"], result["msg"]
    assert by_name(result)["rehearsal"]["observed"]["would_apply"] == 4
    assert by_name(result)["backup_dir"]["observed"]["would_create"] == "%s (mode 0700)" % backups
    assert result["changed"] is False and not backups.exists()
    assert not schema_exists(empty_db)


def test_a_migration_that_would_fail_refuses_the_run_with_file_and_line(empty_db, tmp_path):
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    for f in MIGRATIONS.glob("000[89]_*.sql"):
        (mdir / f.name).write_bytes(f.read_bytes())
    (mdir / "0010_broken.sql").write_text("-- fails on line 4\nCREATE TABLE public.fine (id int);\n\n"
                                          "SELECT 1 / 0;\n")
    result = run(empty_db, migrations_dir=str(mdir), backup_dir=str(tmp_path / "backups"))
    assert result["failed_checks"] == ["rehearsal"], result["msg"]
    offender = by_name(result)["rehearsal"]["offenders"][0]
    assert (offender["filename"], offender["line"], offender["sqlstate"]) == ("0010_broken.sql", 4, "22012")
    assert "0010_broken.sql: would fail at line 4: SQLSTATE 22012" in result["msg"]
    # Refused: nothing created, not even the records schema or the backup directory.
    assert not schema_exists(empty_db) and not schema_exists(empty_db, "app")
    assert not (tmp_path / "backups").exists()


def test_drift_refuses_before_rehearsing(empty_db):
    _record_applied(empty_db, ["0008"], checksum="0" * 64)
    result = run(empty_db, migrations_dir=str(MIGRATIONS))
    checks = by_name(result)
    assert result["failed_checks"] == ["drift"], result["msg"]
    assert checks["drift"]["offenders"][0]["version"] == "0008" and checks["drift"]["offenders"][0]["kind"] == "edited"
    assert checks["rehearsal"]["passed"] is None
    # The records exist: the refusal itself is recorded (a real run).
    assert [(a, o) for a, o, _ in events(empty_db)] == [("precheck", "refused")]


def test_duplicate_versions_refused(empty_db, tmp_path):
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    (mdir / "0008_a.sql").write_text("SELECT 1;\n")
    (mdir / "0008_b.sql").write_text("SELECT 2;\n")
    result = run(empty_db, migrations_dir=str(mdir))
    assert result["failed_checks"] == ["migration_set"]
    assert "duplicate version 0008" in result["msg"]


def test_nothing_pending_reports_the_schema_version_and_creates_nothing(empty_db, tmp_path):
    _record_applied(empty_db, ["0008", "0009", "0010", "0011"])
    result = run(empty_db, migrations_dir=str(MIGRATIONS), backup_dir=str(tmp_path / "backups"))
    assert not result["failed"], result["msg"]
    assert result["pending"] == [] and result["schema_version"] == "0011"
    assert by_name(result)["rehearsal"]["message"] == "nothing pending to rehearse"
    assert result["changed"] is False and not (tmp_path / "backups").exists()


# --------------------------------------------------------------------------- the rehearsal on a live database

SETTINGS_PROBE = """DO $$
BEGIN
  IF current_setting('statement_timeout') <> '30s' OR current_setting('lock_timeout') <> '2s' THEN
    RAISE EXCEPTION 'rehearsal limits: statement_timeout=%, lock_timeout=%',
      current_setting('statement_timeout'), current_setting('lock_timeout');
  END IF;
END $$;
"""


def _set_dir(tmp_path, files):
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    for name, text in files.items():
        (mdir / name).write_text(text)
    return str(mdir)


def _busy_table(url):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE public.busy (id int); INSERT INTO public.busy SELECT generate_series(1, 100)")
    conn.close()


def test_rehearsal_runs_under_bounded_statement_and_lock_timeouts(empty_db, tmp_path):
    # The default limits are in force inside the rehearsal (not the engine's statement_timeout 0).
    mdir = _set_dir(tmp_path, {"0001_probe.sql": SETTINGS_PROBE})
    result = run(empty_db, migrations_dir=mdir)
    assert not result["failed"], result["msg"]
    rehearsal = by_name(result)["rehearsal"]
    assert rehearsal["passed"] and rehearsal["observed"]["would_apply"] == 1
    assert rehearsal["threshold"]["limits"] == {"statement_timeout": "30s", "lock_timeout": "2s", "lock_retries": 0,
                                                "concurrently": "not rehearsed"}
    # Other limits are passed through to the rehearsal's transaction too.
    result = run(empty_db, migrations_dir=mdir, rehearse_statement_timeout="45s")
    assert result["failed_checks"] == ["rehearsal"], result["msg"]
    assert "statement_timeout=45s, lock_timeout=2s" in result["msg"]


def test_concurrently_is_not_rehearsed_so_writers_are_never_blocked(empty_db, session, tmp_path):
    _busy_table(empty_db)
    writer = session(autocommit=False)
    with writer.cursor() as cur:
        cur.execute("INSERT INTO public.busy VALUES (101)")  # holds ROW EXCLUSIVE, as live traffic does
    mdir = _set_dir(tmp_path, {"0001_idx.sql": "-- ledger:no-transaction\n"
                                               "CREATE INDEX CONCURRENTLY busy_id_idx ON public.busy (id);\n"})
    started = time.monotonic()
    result = run(empty_db, migrations_dir=mdir)
    # Without CONCURRENTLY the build would need a SHARE lock, conflicting with the writer.
    assert not result["failed"], result["msg"]
    rehearsal = by_name(result)["rehearsal"]
    assert rehearsal["observed"]["statements_not_rehearsed"] == 1
    assert "1 statement(s) not rehearsed (0001_idx.sql line 2)" in rehearsal["message"]
    assert "CONCURRENTLY: not rehearsed" in " ".join(rehearsal["observed"]["results"])
    assert time.monotonic() - started < 2
    writer.commit()
    with writer.cursor() as cur:
        cur.execute("SELECT to_regclass('public.busy_id_idx') IS NULL, count(*) FROM public.busy")
        assert cur.fetchone() == (True, 101)


def test_a_lock_timeout_means_not_fully_rehearsed_and_is_not_retried(empty_db, session, tmp_path):
    _busy_table(empty_db)
    reader = session(autocommit=False)
    with reader.cursor() as cur:
        cur.execute("SELECT count(*) FROM public.busy")  # ACCESS SHARE, held by a young transaction
    mdir = _set_dir(tmp_path, {"0001_ok.sql": "CREATE TABLE public.other (id int);\n",
                               "0002_alter.sql": "-- adds a column\nALTER TABLE public.busy ADD COLUMN note text;\n",
                               "0003_after.sql": "SELECT 1;\n"})
    backups = tmp_path / "backups"
    started = time.monotonic()
    result = run(empty_db, migrations_dir=mdir, rehearse_lock_timeout="300ms", backup_dir=str(backups))
    took = time.monotonic() - started
    assert result["failed_checks"] == ["rehearsal"], result["msg"]
    rehearsal = by_name(result)["rehearsal"]
    assert rehearsal["observed"]["incomplete"] is True
    assert rehearsal["offenders"][0]["sqlstate"] == "55P03" and rehearsal["offenders"][0]["line"] == 2
    assert "could not be fully rehearsed" in result["msg"]
    assert "0002_alter.sql at line 2 hit the rehearsal's lock_timeout 300ms" in result["msg"]
    assert "not rehearsed after it: 0003_after.sql" in result["msg"]
    assert "-e precheck_rehearse=false" in result["msg"] and "quieter moment" in result["msg"]
    assert took < 1.5  # one attempt of 300 ms: no retry, no back-off
    # Refused, nothing changed; the reader was never disturbed.
    assert not schema_exists(empty_db) and not backups.exists()
    with reader.cursor() as cur:
        cur.execute("SELECT count(*) FROM public.busy")
        assert cur.fetchone()[0] == 100
    reader.rollback()
    # Once the table is free, the same set rehearses.
    assert not run(empty_db, migrations_dir=mdir, rehearse_lock_timeout="300ms")["failed"]


def test_a_statement_timeout_means_not_fully_rehearsed(empty_db, tmp_path):
    mdir = _set_dir(tmp_path, {"0001_slow.sql": "CREATE TABLE public.t (id int);\nSELECT pg_sleep(5);\n"})
    started = time.monotonic()
    result = run(empty_db, migrations_dir=mdir, rehearse_statement_timeout="200ms")
    assert time.monotonic() - started < 3
    assert result["failed_checks"] == ["rehearsal"], result["msg"]
    assert by_name(result)["rehearsal"]["offenders"][0]["sqlstate"] == "57014"
    assert "could not be fully rehearsed" in result["msg"]
    assert "statement_timeout 200ms" in result["msg"]
    assert "precheck_rehearse_statement_timeout" in result["msg"] and "-e precheck_rehearse=false" in result["msg"]
    assert not schema_exists(empty_db)


def test_unreachable_server_names_the_target_never_the_password():
    result = run("postgresql://someone:s3cret-pw@127.0.0.1:1/ledger", connect_timeout=2)
    assert result["failed"]
    assert "someone@127.0.0.1:1/ledger" in result["msg"]
    assert "s3cret-pw" not in repr(result)
    assert by_name(result)["server_version"]["observed"] == {"reachable": False}


def test_a_non_superuser_migration_role_is_checked_for_what_verify_revert_and_restore_need(pg_cluster):
    """Membership for SET ROLE arrakis_app, CREATEDB for a restore, ownership of what the down scripts drop."""
    from conftest import apply_sql_files

    role = "mig_" + uuid.uuid4().hex[:8]
    name = pg_cluster.create_db()
    admin = pg_cluster.connect(name)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE ROLE %s LOGIN BYPASSRLS" % role)
            cur.execute('GRANT CREATE ON DATABASE "%s" TO %s' % (name, role))
            cur.execute("GRANT CREATE ON SCHEMA public TO %s" % role)
        url = pg_cluster.url(name, user=role)
        c = by_name(run(url, migrations_dir=str(MIGRATIONS)))["stage_privileges"]
        assert c["passed"] is False
        assert "SET ROLE arrakis_app" in c["message"] and "CREATEDB" in c["message"]
        assert "GRANT arrakis_app TO %s;" % role in c["next"] and "ALTER ROLE %s CREATEDB;" % role in c["next"]
        with admin.cursor() as cur:
            cur.execute("GRANT arrakis_app TO %s" % role)
            cur.execute("ALTER ROLE %s CREATEDB" % role)
        assert by_name(run(url, migrations_dir=str(MIGRATIONS)))["stage_privileges"]["passed"] is True
        # 0008-0009 applied by another role (postgres): their down scripts drop what this role does not own.
        apply_sql_files(pg_cluster.url(name), up_to="0009")
        c = by_name(run(url, migrations_dir=str(MIGRATIONS)))["stage_privileges"]
        assert c["passed"] is False and "ownership of table public.lot_entries" in c["message"] + str(c["offenders"])
        assert "GRANT postgres TO %s;" % role in c["next"]
        # A superuser has it all.
        assert by_name(run(pg_cluster.url(name), migrations_dir=str(MIGRATIONS)))["stage_privileges"]["passed"]
    finally:
        admin.close()
        pg_cluster.drop_db(name)
        with pg_cluster.connect() as conn, conn.cursor() as cur:
            cur.execute("DROP ROLE IF EXISTS %s" % role)


# --------------------------------------------------------------------------- a rehearsal racing another run

RACE_SET = {"0001_hold.sql": "CREATE TABLE public.hold_probe (i int);\nSELECT pg_sleep(6);\n"}


def test_a_rehearsal_racing_a_migrate_that_holds_the_lease_is_not_called_a_defect(empty_db, tmp_path):
    """A real migrate run holds the lease, its 0001 in flight (its table created, not committed): the precheck
    inspected 0001 as pending, and its rehearsal's CREATE TABLE waits on that run's uncommitted one until the
    rehearsal's lock_timeout. That is not a defect of the file: the check passes as not conclusive, naming the
    run, and the migrate stage would wait for that lease."""
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
    from ledgertest import write_set
    from test_engine_locks import Bg, wait_for
    mdir = write_set(tmp_path / "m", RACE_SET)
    other = Bg(engine.apply, empty_db, engine.load_migration_set(str(mdir)), run_id="migrate-other",
               statement_timeout="60s")
    other.start()
    q = psycopg2.connect(empty_db)
    q.autocommit = True
    try:
        assert wait_for(lambda: _running(q, "SELECT pg_sleep(6)"), timeout=60)  # 0001 in flight, the lease held
        result = run(empty_db, migrations_dir=str(mdir), rehearse_lock_timeout="1s")
        rehearsal = by_name(result)["rehearsal"]
        assert rehearsal["passed"] is True and rehearsal["observed"]["inconclusive"] is True, rehearsal
        assert ("not conclusive: another run (run id migrate-other) holds the run lease and is applying migrations"
                in rehearsal["message"]), rehearsal["message"]
        assert "0001_hold.sql at line 1" in rehearsal["message"]
    finally:
        other.join(60)
        q.close()
    assert other.error is None and [a["version"] for a in other.result["applied"]] == ["0001"]


def test_a_rehearsal_of_what_another_run_applied_meanwhile_says_so(empty_db, tmp_path):
    """The precheck's inspection, another run's apply, then the rehearsal of the stale pending list (the real
    functions, in the order a race gives): the rehearsal fails (the table exists), the check says why."""
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_precheck_migrations import (
        check_migrations, check_rehearsal)
    from ledgertest import write_set
    mdir = write_set(tmp_path / "m", {"0001_t.sql": "CREATE TABLE public.raced (i int);\n"})
    params = {"migrations_dir": str(mdir), "rehearse": True, "rehearse_statement_timeout": "30s",
              "rehearse_lock_timeout": "2s", "run_id": "precheck-run"}
    conn = psycopg2.connect(empty_db)
    conn.autocommit = True
    try:
        _checks, state = check_migrations(conn, params)
        assert state["pending"] == ["0001"]
        engine.apply(empty_db, engine.load_migration_set(str(mdir)), run_id="the-other-run")
        rehearsal, results = check_rehearsal(conn, empty_db, params, state, [])
    finally:
        conn.close()
    assert rehearsal["passed"] is True and rehearsal["observed"]["raced"] == "another run applied 0001", rehearsal
    assert "SQLSTATE 42P07" in rehearsal["message"] and results is None


def _running(conn, query):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s", (query,))
        return cur.fetchone()[0] > 0
