"""The way back under faults (issue 17), against a real PostgreSQL 15.

Kill points are made deterministic by holding a lock on the object the stage touches next, never
by sleeping: the swap's first statement (ALTER DATABASE <db> RENAME) updates the target's row of
pg_database, so a transaction holding that row FOR UPDATE stops the restore exactly inside its
swap transaction, after it has terminated the sessions and before anything is renamed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import APPLICATION_NAME, LedgerError
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_leftovers import leftover_databases
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_rollback_restore as restore_mod
from pghelpers import history, load_module, q
from test_rollback_restore import databases, revert_0011, rollback, target  # noqa: F401 - the shared fixture

ROOT = Path(__file__).resolve().parents[2]


class SwapBlocker(object):
    """Holds the target's pg_database row FOR UPDATE: a restore's swap waits right there."""

    def __init__(self, cluster, dbname):
        self.conn = psycopg2.connect(cluster.url())
        with self.conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s FOR UPDATE", (dbname,))
        self.cluster = cluster

    def wait_for_swap(self, timeout=60, gone=lambda: None):
        """The pid of the backend whose ALTER DATABASE ... RENAME waits on the row (``gone``: why the
        restore will never get there, or None)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows = q(self.cluster.url(), "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                         " AND query LIKE 'ALTER DATABASE%%RENAME%%'")
            if rows:
                return rows[0][0]
            why = gone()
            if why:
                raise AssertionError("the restore never reached its swap: %s" % why)
            time.sleep(0.05)
        raise AssertionError("the restore never reached its swap")

    def release(self):
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def accepts_connections(cluster, name):
    return q(cluster.url(), "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,))[0][0]


def lease_events(url, outcome):
    return q(url, "SELECT detail FROM migrations.events WHERE action = 'lock_wait' AND outcome = %s", (outcome,))


# --------------------------------------------------------------------------- 1. two restores at once

def test_two_restores_exclude_each_other_and_each_names_its_own_databases(target):
    target.take_backup()
    revert_0011(target.url)
    q(target.url, "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                  " VALUES ('11111111-1111-1111-1111-111111111111', 'seed', 5)")
    results = {}

    def run(key, **extra):
        try:
            results[key] = target.restore(run_id="run-" + key, **extra)
        except LedgerError as exc:  # pragma: no cover - reported by the assertions below
            results[key] = exc

    blocker = SwapBlocker(target.cluster, target.name)
    try:
        first = threading.Thread(target=run, args=("a",))
        first.start()
        blocker.wait_for_swap()
        # The first holds the lease and, inside its swap, the database's lock: the second can neither take
        # the lease nor even connect to the target until the first is done (it must not restore beside it).
        second = threading.Thread(target=run, args=("b",), kwargs={"lock_wait": 120})
        second.start()
        time.sleep(0.5)  # not a synchronisation point: the assertions below hold whatever the second has reached
        assert "b" not in results
    finally:
        blocker.release()
    a, b = finished(results, (first, "a"), (second, "b"))
    # Unique names per run; each message names the databases of its own run.
    assert len({a["staging_database"], b["staging_database"], a["previous_database"], b["previous_database"]}) == 4
    assert a["previous_database"] in a["msg"] and b["previous_database"] in b["msg"]
    # a kept the real original (with the row written after the backup), b kept a's restored copy.
    before = target.cluster.url(a["previous_database"])
    assert history(before) == ["0008", "0009", "0010"]
    assert q(before, "SELECT count(*) FROM public.credit_lots WHERE amount_micro = 5")[0][0] == 1
    assert history(target.cluster.url(b["previous_database"])) == ["0008", "0009", "0010", "0011"]
    assert history(target.url) == ["0008", "0009", "0010", "0011"]
    # No scratch copy left by either; the lease is free again.
    assert databases(target.cluster, target.name + "\\_restore\\_%") == []
    assert q(target.url, "SELECT count(*) FROM migrations.lock")[0][0] == 0


def test_a_restore_waiting_too_long_refuses_naming_the_holder(target):
    target.take_backup()
    q(target.url, "INSERT INTO migrations.lock (id, run_id, holder, acquired_at, renewed_at, expires_at)"
                  " VALUES (1, 'migrate-run', 'ops@db1 pid 4242 lease abc', now(), now(), now() + interval '1 hour')")
    with pytest.raises(LedgerError) as err:
        target.restore(lock_wait=1)
    assert "migrate-run" in err.value.msg and "pid 4242" in err.value.msg
    assert err.value.fields["sqlstate"] == "55P03"
    assert err.value.fields["event_logged"] is True
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == []


class LeaseParker(object):
    """Holds the target's lease row FOR UPDATE once a restore holds the lease: its park() (the last
    statement on the target before the swap) waits right there, lease held, copy restored and checked."""

    def __init__(self, url, timeout=120):
        deadline = time.time() + timeout
        while not q(url, "SELECT 1 FROM migrations.lock WHERE holder LIKE 'restore by %%'"):
            assert time.time() < deadline, "the restore never took the lease"
            time.sleep(0.05)
        self.url = url
        self.conn = psycopg2.connect(url)
        with self.conn.cursor() as cur:
            cur.execute("SELECT 1 FROM migrations.lock WHERE id = 1 FOR UPDATE")

    def wait_for_park(self, results, timeout=120):
        """The pid of the restore's backend whose park() waits on the row."""
        deadline = time.time() + timeout
        while True:
            rows = q(self.url, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND query LIKE 'UPDATE migrations.lock%%' AND datname = current_database()")
            if rows:
                return rows[0][0]
            assert time.time() < deadline and "restore" not in results, (
                "the restore never reached the swap: %s" % getattr(results.get("restore"), "msg", None))
            time.sleep(0.05)

    def release(self):
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def in_thread(results, key, call, **kwargs):
    """call(**kwargs) in a thread, started: results[key] is its result, or its LedgerError."""
    def run():
        try:
            results[key] = call(**kwargs)
        except LedgerError as exc:  # pragma: no cover - reported by the callers' assertions
            results[key] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def finished(results, *threads):
    """The results of (thread, key) pairs once each thread has ended (120 s at most): none a LedgerError."""
    for thread, _key in threads:
        if thread is not None:
            thread.join(120)
    out = [results[key] for _thread, key in threads]
    for result in out:
        assert not isinstance(result, Exception), result
    return out


# A restore that LeaseParker holds at its park(). terminate_connections: the parker's session is connected
# when the restore looks; it is on its way out at the swap. A run waiting for the lease must be neither
# terminated nor in the way.
PARKED = dict(run_id="run-restore", swap_timeout=3, terminate_connections=True)


def test_a_migrate_waiting_for_the_lease_does_not_block_the_restores_swap(target):
    """A real migrate run waiting for the lease held by a restore: it holds no session on the target
    meanwhile (it would block the swap until swap_timeout), and then works on the restored database."""
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
    from test_rollback_restore import MIGRATIONS
    mset = engine.load_migration_set(str(MIGRATIONS))
    for m in mset:  # the fixture's history as the engine records it (no drift for the migrate run)
        q(target.url, "UPDATE migrations.history SET name = %s, checksum = %s WHERE version = %s",
          (m.name, m.checksum, m.version))
    target.take_backup()
    revert_0011(target.url)  # the target at 0010: 0011 is pending for the migrate run below
    results = {}

    def migrate():
        try:
            results["migrate"] = engine.apply(target.url, mset,
                                              run_id="run-waiting", lock_wait=120, lock_ttl=60)
        except LedgerError as exc:  # pragma: no cover - reported by the assertions below
            results["migrate"] = exc

    first = in_thread(results, "restore", target.restore, **PARKED)
    parker = LeaseParker(target.url)
    try:
        waiting = threading.Thread(target=migrate)
        waiting.start()
        deadline = time.time() + 60
        while not q(target.url, "SELECT 1 FROM migrations.events WHERE action = 'lock_wait' AND outcome = 'waiting'"
                                " AND run_id = 'run-waiting'"):
            assert time.time() < deadline and "migrate" not in results, getattr(results.get("migrate"), "msg", None)
            time.sleep(0.05)
        parked = parker.wait_for_park(results)
        # Waiting, the migrate run keeps no session on the target (its polls come and go in milliseconds).
        deadline = time.time() + 10
        while q(target.url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND application_name LIKE 'ledger-migrations%%' AND pid <> %s", (parked,))[0][0]:
            assert time.time() < deadline, "the waiting run holds a session on the target"
            time.sleep(0.01)
    finally:
        parker.release()
    r, m = finished(results, (first, "restore"), (waiting, "migrate"))
    # Never a session of the waiting run (each is named ledger-migrations...). The test's own sessions (the
    # parker's, its last poll's) release what they hold a moment before their backends leave
    # pg_stat_activity: the swap may still see one closing, and terminate it.
    assert r["changed"] is True
    assert [s for s in r["terminated"] if s["application_name"].startswith(APPLICATION_NAME)] == []
    # The waiter took the lease on the restored database (at 0011): nothing left to apply there.
    assert m["version_before"] == "0011" and m["applied"] == [] and m["lock"]["waited_s"] > 0
    assert history(target.url) == ["0008", "0009", "0010", "0011"]
    assert history(target.cluster.url(r["previous_database"])) == ["0008", "0009", "0010"]
    assert q(target.url, "SELECT count(*) FROM migrations.lock")[0][0] == 0


def cleanup(target, check_mode=False, **params):
    args = {"database_url": target.url, "mode": "cleanup", "drop_leftovers": True, "run_id": "run-cleanup",
            "host_label": "testhost"}
    args.update(params)
    return rollback.run(args, check_mode=check_mode)


def test_the_leftovers_cleanup_waits_for_a_restore_in_progress_and_never_drops_its_copy(target):
    """A real restore held with its lease and its checked scratch copy (at park()): a cleanup refuses naming it
    or waits for it; the copy survives; once the restore is done the cleanup drops the real leftovers."""
    target.take_backup()
    revert_0011(target.url)
    leftover = target.name + "_restore_20260101000000_abcdef"  # a killed restore's, long ago
    q(target.cluster.url(), 'CREATE DATABASE "%s"' % leftover)
    results = {}
    first = in_thread(results, "restore", target.restore, **PARKED)
    parker = LeaseParker(target.url)
    second = None
    try:
        parker.wait_for_park(results)
        live = [n for n in databases(target.cluster, target.name + "\\_restore\\_%") if n != leftover]
        assert len(live) == 1, live  # the restore's checked copy, waiting for its swap
        # Refused within a short wait, naming the restore; nothing is dropped.
        with pytest.raises(LedgerError) as err:
            cleanup(target, lock_wait=1)
        assert "run-restore" in err.value.msg and "restore by " in err.value.msg
        assert err.value.fields["sqlstate"] == "55P03" and "rollback_drop_leftovers=true" in err.value.fields[
            "next_command"]
        assert databases(target.cluster, target.name + "\\_restore\\_%") == sorted(live + [leftover])
        # Within a long one, it waits (saying so in the events) while the copy stays.
        second = in_thread(results, "cleanup", cleanup, target=target, lock_wait=120, lock_ttl=60)
        deadline = time.time() + 60
        while not q(target.url, "SELECT 1 FROM migrations.events WHERE action = 'lock_wait' AND outcome = 'waiting'"
                                " AND run_id = 'run-cleanup' AND detail->'holder'->>'run_id' = 'run-restore'"):
            assert time.time() < deadline and "cleanup" not in results, getattr(results.get("cleanup"), "msg", None)
            time.sleep(0.05)
        assert "cleanup" not in results
        assert databases(target.cluster, live[0]) == live
    finally:
        parker.release()
    r, c = finished(results, (first, "restore"), (second, "cleanup"))
    assert r["changed"] is True and r["staging_database"] == live[0]
    assert history(target.url) == ["0008", "0009", "0010", "0011"]
    # After the restore: the killed run's scratch copy is dropped; the database this restore kept is not
    # (it holds what was written after the backup): it is listed, and dropped only by its own consent.
    assert [d["name"] for d in c["dropped"]] == [leftover]
    assert [(d["name"], d["kind"]) for d in c["left"]] == [(r["previous_database"], "kept")]
    assert c["in_use"] == [] and c["failed"] is False
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == [r["previous_database"]]
    kept = cleanup(target, drop_leftovers=False, drop_kept=True)
    assert [d["name"] for d in kept["dropped"]] == [r["previous_database"]] and kept["left"] == []
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == []
    assert q(target.url, "SELECT count(*) FROM migrations.lock")[0][0] == 0


KEPT_LOSS = "the rows written to %s after the backup its restore used, which no other database holds"


def make_leftovers(target):
    """A killed restore's scratch copy and a database kept by a restore (holding a row written after its backup)."""
    scratch = target.name + "_restore_20260101000000_abcdef"
    kept = target.name + "_pre_restore_20260101000000_abcdef"
    for name in (scratch, kept):
        q(target.cluster.url(), 'CREATE DATABASE "%s"' % name)
    q(target.cluster.url(kept), "CREATE TABLE late_payment (amount_micro bigint); INSERT INTO late_payment VALUES (42)")
    return scratch, kept


def test_drop_leftovers_drops_scratch_copies_and_keeps_the_kept_databases_naming_their_command(target):
    scratch, kept = make_leftovers(target)
    planned = cleanup(target, check_mode=True)
    assert [d["name"] for d in planned["dropped"]] == [scratch] and [d["name"] for d in planned["left"]] == [kept]
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == sorted([kept, scratch])

    done = cleanup(target)
    assert done["failed"] is False and done["changed"] is True
    assert [d["name"] for d in done["dropped"]] == [scratch]
    assert [(d["name"], d["kind"]) for d in done["left"]] == [(kept, "kept")]
    # The kept database and its row are there; the scratch copy is gone.
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == [kept]
    assert q(target.cluster.url(kept), "SELECT amount_micro FROM late_payment") == [(42,)]
    # Listed as kept (name, size, age), with what it holds, then the exact command that would drop it: that
    # command alone (no rollback_drop_leftovers), for this target.
    msg = done["msg"]
    assert "dropped: %s (scratch copy of a restore that did not finish, " % scratch in msg
    assert "left as they are (not asked to drop): %s (kept by a restore, " % kept in msg
    assert " old)" in msg.split(kept, 1)[1] and "size unknown" not in msg and "age unknown" not in msg
    assert KEPT_LOSS % target.name in msg
    assert msg.endswith("drop the kept databases only once none of those rows is wanted: "
                        "ansible-playbook playbooks/rollback.yml -l testhost -e rollback_drop_kept=true")
    assert msg.index(KEPT_LOSS % target.name) < msg.index("rollback_drop_kept=true")

    # Through the module tail with a restore run's options: the command restores nothing and drops only those.
    result = rollback.result_of({"database_url": target.url, "mode": "cleanup", "drop_leftovers": True,
                                 "host_label": "testhost", "run_options": [
                                     "-l", "testhost", "-e", "rollback_mode=restore", "-e", "backup_file=/b/x.dump",
                                     "-e", "rollback_drop_leftovers=true"]})
    assert result["dropped"] == [] and [d["name"] for d in result["left"]] == [kept]
    assert result["msg"].endswith(": ansible-playbook playbooks/rollback.yml -l testhost -e backup_file=/b/x.dump "
                                  "-e rollback_drop_kept=true")
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == [kept]


def test_drop_kept_drops_the_kept_databases_only_and_says_dropped_only_once_drop_database_returned(target):
    scratch, kept = make_leftovers(target)
    other = target.name + "_pre_restore_20260102000000_fedcba"
    q(target.cluster.url(), 'CREATE DATABASE "%s"' % other)
    planned = cleanup(target, check_mode=True, drop_leftovers=False, drop_kept=True)
    assert sorted(d["name"] for d in planned["dropped"]) == sorted([kept, other])
    assert "would drop: " in planned["msg"]
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == sorted([kept, other, scratch])

    # A database DROP DATABASE refuses (a template database can't be dropped) is not said dropped.
    q(target.cluster.url(), 'ALTER DATABASE "%s" IS_TEMPLATE true' % other)
    try:
        done = cleanup(target, drop_leftovers=False, drop_kept=True)
    finally:
        q(target.cluster.url(), 'ALTER DATABASE "%s" IS_TEMPLATE false' % other)
    assert [d["name"] for d in done["dropped"]] == [kept]
    (refused,) = done["not_dropped"]
    assert refused["name"] == other and "cannot drop a template database" in refused["error"]
    assert refused["command"].startswith("psql ") and 'DROP DATABASE' in refused["command"]
    assert done["failed"] is True and "could NOT drop: %s" % other in done["msg"]
    assert "dropped: %s" % kept in done["msg"] and "dropped: %s" % other not in done["msg"]
    # Alone, it leaves the scratch copy, naming the command that drops that (and only that).
    assert [(d["name"], d["kind"]) for d in done["left"]] == [(scratch, "scratch")]
    assert ("drop the scratch copies (nothing uses them): "
            "ansible-playbook playbooks/rollback.yml -l testhost -e rollback_drop_leftovers=true") in done["msg"]
    assert "rollback_drop_kept" not in done["msg"] and KEPT_LOSS % target.name not in done["msg"]
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == sorted([other, scratch])

    # Both consents together: every leftover goes.
    both = cleanup(target, drop_kept=True)
    assert sorted(d["name"] for d in both["dropped"]) == sorted([other, scratch]) and both["left"] == []
    assert databases(target.cluster, target.name + "\\_%restore\\_%") == []


def test_the_cleanup_keeps_the_scratch_copy_of_the_lease_it_took_over(target):
    """A restore whose lease expired (its beats failed) may still be restoring: its copy is kept all the same."""
    q(target.url, "INSERT INTO migrations.lock (id, run_id, holder, acquired_at, renewed_at, expires_at)"
                  " VALUES (1, 'slow-restore', 'restore by ops@db1 pid 4242 lease 0a1b2c3d4e5f6789', now(), now(),"
                  " now() + interval '1 hour')")
    mine, other = target.name + "_restore_20260101000000_0a1b2c", target.name + "_restore_20260101000000_999999"
    for name in (mine, other):
        q(target.cluster.url(), 'CREATE DATABASE "%s"' % name)
    # That run may have swapped already: the database it kept is its own too, whichever consent is given.
    mine_kept = target.name + "_pre_restore_20260101000000_0a1b2c"
    q(target.cluster.url(), 'CREATE DATABASE "%s"' % mine_kept)
    planned = cleanup(target, check_mode=True, drop_kept=True)
    assert [d["name"] for d in planned["dropped"]] == [other]
    assert sorted(d["name"] for d in planned["in_use"]) == sorted([mine, mine_kept])
    assert "kept %s: the scratch copy of run slow-restore" % mine in planned["msg"]
    assert "kept %s: the database kept by the restore of run slow-restore" % mine_kept in planned["msg"]
    q(target.url, "UPDATE migrations.lock SET expires_at = now() - interval '1 second'")
    done = cleanup(target, drop_kept=True)
    assert [d["name"] for d in done["dropped"]] == [other]
    assert sorted(d["name"] for d in done["in_use"]) == sorted([mine, mine_kept])
    assert databases(target.cluster, target.name + "\\_restore\\_%") == [mine]
    assert databases(target.cluster, target.name + "\\_pre\\_restore\\_%") == [mine_kept]
    assert q(target.url, "SELECT count(*) FROM migrations.lock")[0][0] == 0


# --------------------------------------------------------------------------- 2 + 6. killed at the swap

CHILD = r"""
import json, os, sys
from ansible_collections.arrakis.ledger.plugins.modules import ledger_rollback
args = json.loads(sys.argv[1])
pid = os.fork()
if pid == 0:
    # Like Ansible's worker: its own session, so a kill of the playbook's process group misses it.
    os.setsid()
    try:
        ledger_rollback.run(args)
    finally:
        os._exit(0)
print(pid, flush=True)
os.waitpid(pid, 0)
"""


def test_killing_the_playbook_at_the_swap_leaves_the_original_accepting_connections(target, tmp_path):
    """SIGKILL of the parent (the playbook) while its worker, in another session, waits inside the swap."""
    target.take_backup()
    revert_0011(target.url)
    app = psycopg2.connect(target.cluster.url(target.name), application_name="ledger-app")
    args = {"database_url": target.url, "mode": "restore", "backup_dir": str(target.backup_dir),
            "run_id": "killed-run", "terminate_connections": True, "lock_ttl": 2, "swap_timeout": 1}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".collections"), os.environ.get("PYTHONPATH", "")]))
    blocker = SwapBlocker(target.cluster, target.name)
    parent = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    try:
        worker = int(parent.stdout.readline())
        backend = blocker.wait_for_swap()
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(30)
        # The worker dies with its parent (PR_SET_PDEATHSIG), though the process-group kill missed it.
        deadline = time.time() + 30
        while True:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            assert time.time() < deadline, "the worker outlived the playbook"
            time.sleep(0.05)
    finally:
        blocker.release()
        app.close()
    # Its swap transaction is rolled back by the server once its client is gone.
    deadline = time.time() + 30
    while q(target.cluster.url(), "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,))[0][0]:
        assert time.time() < deadline
        time.sleep(0.05)
    # The target is the original, under its name, and accepts connections (nothing set ALLOW_CONNECTIONS false).
    assert accepts_connections(target.cluster, target.name) is True
    assert history(target.url) == ["0008", "0009", "0010"]
    # The killed run's scratch copy stays, and is found by name with its size and age.
    conn = psycopg2.connect(target.cluster.url())
    try:
        with conn.cursor() as cur:
            found = leftover_databases(cur, target.name)
    finally:
        conn.close()
    assert [d["kind"] for d in found] == ["scratch"]
    assert found[0]["size_bytes"] > 0 and found[0]["age_s"] is not None and found[0]["allows_connections"]


# --------------------------------------------------------------------------- 4. cleanup said only when known

def test_a_cleanup_that_could_not_run_says_so_with_the_command(target):
    name = target.name + "_restore_20260101000000_abcdef"
    q(target.cluster.url(), 'CREATE DATABASE "%s"' % name)
    conn = psycopg2.connect(target.cluster.url())
    conn.autocommit = True
    cur = conn.cursor()
    # The server side of the admin connection is gone (as when the server stops), and no new one can be made.
    q(target.cluster.url(), "SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
    how = {"host": "127.0.0.1", "port": target.cluster.port, "user": "postgres", "dbname": "postgres"}
    unreachable = target.cluster.url("no_such_maintenance_db")
    text, dropped = restore_mod._drop_scratch(cur, unreachable, name, how, {"connect_timeout": 5})
    conn.close()
    assert dropped is False
    assert "could NOT be dropped" in text and "was dropped" not in text
    assert 'DROP DATABASE "%s" WITH (FORCE)' % name in text and "rollback_drop_leftovers=true" in text
    assert databases(target.cluster, name) == [name]
    text, dropped = restore_mod._drop_scratch(None, target.cluster.url(), name, how, {"connect_timeout": 5})
    assert dropped is True and text.endswith("%s was dropped" % name)
    assert databases(target.cluster, name) == []


# --------------------------------------------------------------------------- 7. refusals are logged

def test_a_refused_restore_of_a_corrupted_backup_logs_its_failed_event(target):
    result = target.take_backup()
    path = Path(result["backup_file"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError) as err:
        target.restore()
    assert err.value.fields["event_logged"] is True
    rows = q(target.url, "SELECT outcome, run_id, detail->>'error' FROM migrations.events WHERE action = 'restore'")
    assert [r[:2] for r in rows] == [("failed", "test-restore")] and "sha256" in rows[0][2]
    assert q(target.url, "SELECT count(*) FROM migrations.lock")[0][0] == 0


# --------------------------------------------------------------------------- 2 + 3. the precheck says what it found

def test_the_precheck_lists_leftovers_and_says_why_a_target_refuses_connections(target):
    precheck = load_module("ledger_precheck")
    scratch = target.name + "_restore_20260101000000_abcdef"
    kept = target.name + "_pre_restore_20260101000000_abcdef"
    for name in (scratch, kept):
        q(target.cluster.url(), 'CREATE DATABASE "%s"' % name)
    try:
        result = precheck.run_precheck({"database_url": target.url})
        found = next(c for c in result["checks"] if c["name"] == "restore_leftovers")
        assert found["passed"] is True
        assert sorted((d["name"], d["kind"]) for d in found["observed"]) == [(kept, "kept"), (scratch, "scratch")]
        assert all(d["size_bytes"] > 0 and d["age_s"] > 0 for d in found["observed"])
        assert scratch in found["message"] and kept in found["message"]
        # Each kind with its own command; the kept one after what dropping it loses.
        drop_scratch = "ansible-playbook playbooks/rollback.yml -l <limit> -e rollback_drop_leftovers=true"
        drop_kept = "ansible-playbook playbooks/rollback.yml -l <limit> -e rollback_drop_kept=true"
        assert found["next"] == (
            "drop the scratch copies (nothing uses them): %s; each kept database is kept on purpose: it holds %s: "
            "dropping it loses them; drop the kept databases only once none of those rows is wanted: %s"
            % (drop_scratch, KEPT_LOSS % target.name, drop_kept))
        # Kept databases alone: only their command; scratch copies alone: only theirs.
        target.cluster.drop_db(scratch)
        found = next(c for c in precheck.run_precheck({"database_url": target.url})["checks"]
                     if c["name"] == "restore_leftovers")
        assert [d["name"] for d in found["observed"]] == [kept] and "kept by a restore" in found["message"]
        assert found["next"].endswith(drop_kept) and KEPT_LOSS % target.name in found["next"]
        assert "rollback_drop_leftovers" not in found["next"]
        target.cluster.drop_db(kept)
        q(target.cluster.url(), 'CREATE DATABASE "%s"' % scratch)
        found = next(c for c in precheck.run_precheck({"database_url": target.url})["checks"]
                     if c["name"] == "restore_leftovers")
        assert [d["name"] for d in found["observed"]] == [scratch]
        assert found["next"] == "drop the scratch copies (nothing uses them): %s" % drop_scratch

        q(target.cluster.url(), 'ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % target.name)
        result = precheck.run_precheck({"database_url": target.url})
        reach = next(c for c in result["checks"] if c["name"] == "server_version")
        assert reach["passed"] is False and "datallowconn is false" in reach["message"]
        assert "rollback_allow_connections=true" in reach["next"] and "pg_hba" not in reach["next"]
    finally:
        q(target.cluster.url(), 'ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % target.name)
        for name in (scratch, kept):
            target.cluster.drop_db(name)


def test_a_run_waiting_for_a_dead_runners_lease_says_so_while_it_waits(target, capsys):
    from ansible.utils.display import Display  # the worker's Display: loaded, so the module speaks through it
    Display()
    target.take_backup()
    q(target.url, "INSERT INTO migrations.lock (id, run_id, holder, acquired_at, renewed_at, expires_at)"
                  " VALUES (1, 'dead-run', 'ops@db1 pid 4242 lease abc', now() - interval '5 minutes',"
                  " now() - interval '5 minutes', now() + interval '2 seconds')")
    result = target.restore(lock_wait=30, lock_ttl=60)
    out = capsys.readouterr().out
    assert "waiting for the run lease" in out and "dead-run" in out and "expires in" in out
    assert result["changed"] is True
