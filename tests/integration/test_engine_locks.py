"""The engine's lease, lock timeouts and retries, against a real PostgreSQL 15.

A runner SIGKILLed in the middle of a long migration, two concurrent runs, a run
waiting behind another one's CREATE INDEX CONCURRENTLY, a table lock held by
another session (lock_timeout, retries with back-off, the final failure, and how
long an application query queues behind the migration), and the lease through a
real PgBouncer in transaction pooling mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import create_records
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_runner import Runner, run_settings
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError

from ledgertest import load, write_set
from test_engine import events, history, one, q

TESTS = Path(__file__).resolve().parent

RUNNER = """
import json, sys
sys.path.insert(0, %r)  # the checkout as ansible_collections/arrakis/ledger (make setup)
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as e
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
url, directory = sys.argv[1], sys.argv[2]
res = e.apply(url, e.load_migration_set(directory), run_id="doomed-run", lock_ttl=2,
              advice=PlaybookAdvice("testenv"))
print(json.dumps(res, default=str))
""" % str(TESTS.parents[1] / ".collections")

# pg_sleep only when the session says so (the killed run's URL sets ledger.sleep).
SLOW = {
    "0001_base.sql": "CREATE TABLE base (i int);",
    "0002_slow.sql": """
        CREATE TABLE killed_probe (i int);
        INSERT INTO killed_probe VALUES (1);
        SELECT pg_sleep(coalesce(nullif(current_setting('ledger.sleep', true), ''), '0')::float8);
    """,
}


class Bg(threading.Thread):
    """Run a callable in a thread; keep its result or exception and its duration."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.result = self.error = None
        self.elapsed = None

    def run(self):
        t0 = time.monotonic()
        try:
            self.result = self.fn(*self.args, **self.kw)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        self.elapsed = time.monotonic() - t0


def wait_for(predicate, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met within %.1fs" % timeout)


def apply(url, directory, **kw):
    kw.setdefault("advice", PlaybookAdvice("testenv"))
    return engine.apply(url, load(directory), **kw)


# --------------------------------------------------------------------------- SIGKILL

def test_a_runner_killed_mid_migration_leaves_no_trace_and_the_next_run_proceeds(tmp_path, empty_db):
    d = write_set(tmp_path / "m", SLOW)
    dbname = empty_db.rsplit("/", 1)[1]
    slow_url = empty_db + "?options=-c%20ledger.sleep%3D60"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, slow_url, str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: (q(empty_db, "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                                            " AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'",
                                  (dbname,)) or [[None]])[0][0], timeout=20)
    except AssertionError:
        proc.kill()
        raise AssertionError("the runner never reached pg_sleep: %s" % proc.communicate()[1][-2000:])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    killed_at = time.monotonic()
    # client_connection_check_interval: the server notices the dead client and ends the backend.
    wait_for(lambda: one(empty_db, "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = %s", (pid,)), timeout=5)
    assert time.monotonic() - killed_at < 4
    # Before or after a migration, never in between: 0002 and its first statements are gone.
    assert history(empty_db) == ["0001"]
    assert one(empty_db, "SELECT to_regclass('public.killed_probe') IS NULL")
    # Its lease is still there (it expires by itself), naming the dead run.
    assert one(empty_db, "SELECT run_id FROM migrations.lock") == "doomed-run"

    res = apply(empty_db, d, lock_wait=15, run_id="rescue-run")
    assert [a["version"] for a in res["applied"]] == ["0002"]
    takeover = res["lock"]["takeover"]
    assert takeover["run_id"] == "doomed-run" and "pid" in takeover["holder"] and takeover["age_s"] >= 0
    assert "took over the expired lease of run doomed-run" in res["msg"]
    assert history(empty_db) == ["0001", "0002"] and one(empty_db, "SELECT count(*) FROM killed_probe") == 1
    ev = [e for e in events(empty_db, "lock_wait") if e[2] == "taken_over"]
    assert ev and ev[0][3]["previous"]["run_id"] == "doomed-run"


# --------------------------------------------------------------------------- two runs at once

def test_two_concurrent_runs_never_interleave(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_slow.sql": "CREATE TABLE c (i int);\nSELECT pg_sleep(1);",
        "0002_row.sql": "INSERT INTO c VALUES (1);",
    })
    create_records(psycopg2.connect(empty_db))  # both runs then race on the lease, not on the schema
    a = Bg(apply, empty_db, d, run_id="run-a", lock_wait=20)
    b = Bg(apply, empty_db, d, run_id="run-b", lock_wait=20)
    a.start()
    b.start()
    a.join(30)
    b.join(30)
    assert a.error is None and b.error is None, (a.error, b.error)
    applied = sorted([len(a.result["applied"]), len(b.result["applied"])])
    assert applied == [0, 2]
    waiter = b.result if not b.result["applied"] else a.result
    assert "another run applied them" in waiter["msg"]
    assert history(empty_db) == ["0001", "0002"] and one(empty_db, "SELECT count(*) FROM c") == 1
    assert [e[2] for e in events(empty_db, "lock_wait")] == ["waiting", "acquired"]
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0


def test_a_run_that_waits_too_long_fails_naming_the_holder(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {"0001_slow.sql": "SELECT pg_sleep(2);"})
    create_records(psycopg2.connect(empty_db))
    holder = Bg(apply, empty_db, d, run_id="holder-run")
    holder.start()
    wait_for(lambda: q(empty_db, "SELECT 1 FROM migrations.lock"))
    t0 = time.monotonic()
    with pytest.raises(LedgerError) as exc:
        apply(empty_db, d, run_id="late-run", lock_wait=0.6)
    assert time.monotonic() - t0 < 2
    msg = exc.value.msg
    assert "another migration run holds" in msg and "run holder-run by " in msg and "expires at" in msg
    assert exc.value.fields["holder"]["run_id"] == "holder-run"
    holder.join(10)
    assert holder.error is None and history(empty_db) == ["0001"]
    assert [e[2] for e in events(empty_db, "lock_wait")] == ["waiting", "timeout"]


def test_a_waiting_run_never_blocks_the_holders_create_index_concurrently(tmp_path, empty_db):
    d = write_set(tmp_path / "m", {
        "0001_t.sql": "CREATE TABLE big AS SELECT g AS i FROM generate_series(1, 20000) g;\nSELECT pg_sleep(0.7);",
        "0002_idx.sql": "-- ledger:no-transaction\nCREATE INDEX CONCURRENTLY big_i_idx ON big (i);\n",
    })
    create_records(psycopg2.connect(empty_db))
    a = Bg(apply, empty_db, d, run_id="cic-run", lock_wait=20)
    a.start()
    wait_for(lambda: q(empty_db, "SELECT 1 FROM migrations.lock"))
    b = Bg(apply, empty_db, d, run_id="waiter-run", lock_wait=20)  # polls while A builds the index
    b.start()
    a.join(15)
    b.join(15)
    assert a.error is None and b.error is None, (a.error, b.error)
    assert a.elapsed < 6, "the concurrent build waited for the waiting run"
    assert [x["version"] for x in a.result["applied"]] == ["0001", "0002"] and b.result["applied"] == []
    assert one(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'big_i_idx'::regclass")


# --------------------------------------------------------------------------- lock_timeout and retries

LOCKED = {
    "0001_t.sql": "CREATE TABLE t (i int);\nINSERT INTO t VALUES (1);",
    "0002_alter.sql": "-- needs ACCESS EXCLUSIVE on t\nALTER TABLE t ADD COLUMN x int;",
}


@pytest.fixture
def held_table(tmp_path, empty_db):
    """A set applied to 0001 and another session holding ACCESS SHARE on t in an open transaction."""
    d = write_set(tmp_path / "m", LOCKED)
    apply(empty_db, d, target="0001")
    blocker = psycopg2.connect(empty_db, application_name="app-reader")
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE t IN ACCESS SHARE MODE")
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    yield d, blocker, pid
    blocker.close()


def test_a_lock_timeout_is_retried_with_back_off_then_fails_cleanly(held_table, empty_db):
    d, blocker, pid = held_table
    time.sleep(0.25)  # let the blocker's transaction age past lock_timeout (named as a likely blocker)
    t0 = time.monotonic()
    with pytest.raises(LedgerError) as exc:
        apply(empty_db, d, lock_timeout="200ms", lock_retries=2, retry_backoff=0.1)
    elapsed = time.monotonic() - t0
    f = exc.value.fields
    assert (f["sqlstate"], f["file"], f["line"], f["attempts"]) == ("55P03", "0002_alter.sql", 2, 3)
    assert 0.6 < elapsed < 3  # 3 attempts of 200 ms plus two jittered back-offs (0.05-0.15, 0.1-0.3)
    assert "lock_timeout=200ms after 3 attempt(s)" in exc.value.msg
    assert "likely blocker: pid %d" % pid in exc.value.msg and "app-reader" in exc.value.msg
    retries = [e for e in events(empty_db, "lock_wait") if e[2] == "retry"]
    assert [e[3]["attempt"] for e in retries] == [1, 2]
    assert all(e[3]["sqlstate"] == "55P03" and e[3]["line"] == 2 for e in retries)
    assert any(b["pid"] == pid for b in retries[0][3]["blockers"])
    assert events(empty_db, "apply")[-1][2] == "failed"
    assert history(empty_db) == ["0001"]
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0  # the lease is released on failure


def test_a_lock_released_during_the_back_off_lets_the_retry_succeed(held_table, empty_db):
    d, blocker, _ = held_table
    threading.Timer(0.5, blocker.rollback).start()
    res = apply(empty_db, d, lock_timeout="200ms", lock_retries=6, retry_backoff=0.1)
    assert res["applied"][0]["version"] == "0002" and res["applied"][0]["attempts"] > 1
    assert history(empty_db) == ["0001", "0002"]


def test_a_role_that_cannot_see_other_sessions_is_told_so_and_which_grant_fixes_it(tmp_path, pg_cluster):
    """A non-superuser without pg_read_all_stats sees no other role's query: the empty list is explained."""
    role = "mig_" + os.urandom(4).hex()
    name = pg_cluster.create_db()
    admin = pg_cluster.connect(name)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE ROLE %s LOGIN" % role)
            cur.execute('GRANT CREATE ON DATABASE "%s" TO %s' % (name, role))
            cur.execute("GRANT CREATE ON SCHEMA public TO %s" % role)
        url = pg_cluster.url(name, user=role)
        d = write_set(tmp_path / "m", LOCKED)
        apply(url, d, target="0001")
        blocker = pg_cluster.connect(name, autocommit=False)  # another role: postgres
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE t IN ACCESS SHARE MODE")
        time.sleep(0.25)
        with pytest.raises(LedgerError) as exc:
            apply(url, d, lock_timeout="200ms", lock_retries=0)
        blocker.close()
        f = exc.value.fields
        assert f["sqlstate"] == "55P03" and f["blockers"] == [] and f["blockers_hidden_from"] == role
        assert ("likely blocker: none visible: the role %s cannot see other roles' sessions" % role) in exc.value.msg
        assert "`GRANT pg_read_all_stats TO \"%s\";`" % role in exc.value.msg
        assert exc.value.msg.count("likely blocker:") == 1
    finally:
        admin.close()
        pg_cluster.drop_db(name)
        with pg_cluster.connect() as c, c.cursor() as cur:
            cur.execute("DROP ROLE IF EXISTS %s" % role)


def test_an_application_query_queued_behind_the_migration_waits_no_longer_than_lock_timeout(held_table, empty_db):
    d, blocker, _ = held_table
    mig = Bg(apply, empty_db, d, lock_timeout="1s", lock_retries=0)
    mig.start()
    # The migration's ACCESS EXCLUSIVE request is queued behind the reader's ACCESS SHARE...
    wait_for(lambda: one(empty_db, "SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass"
                                   " AND mode = 'AccessExclusiveLock' AND NOT granted"), timeout=5, step=0.01)
    # ...and a new application read queues behind that request (PostgreSQL's lock queue is FIFO).
    app = psycopg2.connect(empty_db)
    try:
        t0 = time.monotonic()
        with app.cursor() as cur:
            cur.execute("SELECT count(*) FROM t")
        waited = time.monotonic() - t0
    finally:
        app.close()
    mig.join(10)
    assert isinstance(mig.error, LedgerError) and mig.error.fields["sqlstate"] == "55P03"
    assert waited > 0.5, "the application query did not queue behind the migration (test is not testing)"
    assert waited < 1.0 + 0.3, "the application query waited %.2fs, more than lock_timeout" % waited


# --------------------------------------------------------------------------- PgBouncer transaction pooling

def test_the_lease_works_through_pgbouncer_transaction_pooling(tmp_path, pg_cluster, empty_db):
    sys.path.insert(0, str(TESTS.parents[1] / "scripts"))
    import pgbouncer_ctl

    try:
        pgbouncer_ctl.find_binary()
    except pgbouncer_ctl.BouncerError as exc:
        pytest.skip("no pgbouncer: %s" % exc)
    state = pgbouncer_ctl.start(tmp_path / "pgb", pg_cluster.port, pool_size=2)
    try:
        url = pgbouncer_ctl.url(state, db=empty_db.rsplit("/", 1)[1])
        d = write_set(tmp_path / "m", {
            "0001_slow.sql": "CREATE TABLE c (i int);\nSELECT pg_sleep(0.8);",
            "0002_row.sql": "INSERT INTO c VALUES (1);",
        })
        create_records(psycopg2.connect(empty_db))
        a = Bg(apply, url, d, run_id="bouncer-a", lock_wait=20)
        b = Bg(apply, url, d, run_id="bouncer-b", lock_wait=20)
        a.start()
        time.sleep(0.1)
        b.start()
        a.join(30)
        b.join(30)
        assert a.error is None and b.error is None, (a.error, b.error)
        assert len(a.result["applied"]) == 2 and b.result["applied"] == []
        assert history(empty_db) == ["0001", "0002"] and one(empty_db, "SELECT count(*) FROM c") == 1
        assert [e[2] for e in events(empty_db, "lock_wait")] == ["waiting", "acquired"]
    finally:
        pgbouncer_ctl.stop(tmp_path / "pgb")


# --------------------------------------------------------------------------- one run id, two runners

def test_two_leases_with_one_run_id_never_both_hold_the_target(empty_db):
    """Every host of one playbook run shares ledger_run_id: the lease belongs to a Lease object, not a run id."""
    create_records(psycopg2.connect(empty_db))
    c1, c2 = psycopg2.connect(empty_db), psycopg2.connect(empty_db)
    c1.autocommit = c2.autocommit = True
    first = engine.Lease(empty_db, c1, "shared-run", ttl=30, wait=0.5).acquire()
    second = engine.Lease(empty_db, c2, "shared-run", ttl=30, wait=0.5)
    try:
        assert first.token.startswith("shared-run:") and first.token != second.token
        t0 = time.monotonic()
        with pytest.raises(LedgerError) as exc:
            second.acquire()
        assert time.monotonic() - t0 >= 0.4  # it waited, then gave up: it never "re-took its own" lease
        assert "another migration run holds" in exc.value.msg and first.nonce in exc.value.msg
        # Renewal, the in-transaction check and the release all compare the token, not the run id.
        c2.autocommit = False
        with c2.cursor() as cur:
            with pytest.raises(LedgerError, match="lost its lease"):
                second.check_in_tx(cur)
            second.renew_in_tx(cur)
            assert cur.rowcount == 0
        c2.rollback()
        c2.autocommit = True
        second.held = True  # even a confused release must not delete the other runner's row
        second.release()
        assert q(empty_db, "SELECT run_id, holder FROM migrations.lock") == [("shared-run", first.holder)]
    finally:
        first.release()
        c1.close()
        c2.close()
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0


def test_two_hosts_of_one_playbook_run_on_one_database_never_apply_together(tmp_path, empty_db):
    """Two inventory hosts (say one through PgBouncer, one direct) pointing at one database, same run id."""
    d = write_set(tmp_path / "m", {
        "0001_slow.sql": "CREATE TABLE c (i int);\nSELECT pg_sleep(1);",
        "0002_row.sql": "INSERT INTO c VALUES (1);",
        # Outside any transaction the lease row is not row-locked: only the lease token keeps B out here.
        "0003_idx.sql": "-- ledger:no-transaction\nINSERT INTO c VALUES (2);\nSELECT pg_sleep(1.5);\n"
                        "CREATE INDEX CONCURRENTLY IF NOT EXISTS c_i_idx ON c (i);\n",
    })
    create_records(psycopg2.connect(empty_db))
    a = Bg(apply, empty_db, d, run_id="one-playbook-run", lock_wait=20)
    a.start()
    wait_for(lambda: q(empty_db, "SELECT 1 FROM migrations.lock"))
    b = Bg(apply, empty_db, d, run_id="one-playbook-run", lock_wait=20)
    b.start()
    a.join(30)
    b.join(30)
    assert a.error is None and b.error is None, (a.error, b.error)
    assert [x["version"] for x in a.result["applied"]] == ["0001", "0002", "0003"]
    assert b.result["applied"] == [] and "another run applied them" in b.result["msg"]
    assert b.result["lock"]["waited_s"] > 0.3  # the second runner waited for the first one's lease
    assert history(empty_db) == ["0001", "0002", "0003"]
    assert q(empty_db, "SELECT i FROM c ORDER BY i") == [(1,), (2,)]  # each file ran once
    assert [e[2] for e in events(empty_db, "lock_wait")] == ["waiting", "acquired"]
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0


def test_a_runner_never_takes_another_runners_commit_for_its_own(tmp_path, empty_db):
    """After a connection lost during COMMIT, the runner looks for its own commit: same run id is not enough."""
    d = write_set(tmp_path / "m", {"0001_a.sql": "CREATE TABLE a (i int);"})
    res = apply(empty_db, d, run_id="one-playbook-run")
    assert [x["version"] for x in res["applied"]] == ["0001"]
    r = Runner(empty_db, load(d), "one-playbook-run", run_settings({}), "testenv", "apply")
    try:
        r.lease = engine.Lease(empty_db, r.conn, "one-playbook-run")  # another runner of the same run
        assert engine._recorded(r, "0001") is False
        # The runner that did commit it finds its token in the apply event of the same transaction.
        token = [e[3]["lease"] for e in events(empty_db, "apply")][0]
        r.lease.token = token
        assert engine._recorded(r, "0001") is True
    finally:
        r.conn.close()
