"""A connection lost in the middle of a migration: no "SQLSTATE ?", but what is true.

Two real ways to lose it: pg_terminate_backend on the session running the migration (PostgreSQL
sends FATAL 57P01, which libpq does not pass on through the closed connection), and a real TCP
proxy (dropping_proxy.py) that cuts the client side right after forwarding the marked statement,
so the server session runs on as after a network cut. Either way the failure says there is no
SQLSTATE because the connection was lost, why as far as the server tells, the state found after
reconnecting (history, the old session ended), and the next command; one failed event.
"""

from __future__ import annotations

import re
import threading
import time

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_runner
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice

import psycopg2
import pytest
from dropping_proxy import MARKER, DroppingProxy
from ledgertest import load, write_set
from pghelpers import q
from test_engine import events, history

LONG = "SELECT '%s', pg_sleep(%s)"


def _set(tmp_path, seconds):
    """0001 applies; 0002 creates a table, then runs a marked statement that sleeps `seconds`."""
    return write_set(tmp_path / "m", {
        "0001_first.sql": "CREATE TABLE public.lost_first (id int);\n",
        "0002_slow.sql": "CREATE TABLE public.lost_probe (id int);\n%s;\n" % (LONG % (MARKER.decode(), seconds)),
    })


def _through(proxy, url):
    """The database URL through the proxy (no TLS or GSS negotiation for it to parse)."""
    head, db = url.rsplit("/", 1)
    return "%s:%d/%s?sslmode=disable&gssencmode=disable" % (head.rsplit(":", 1)[0], proxy.port, db)


def _terminate_when_running(admin_url, stop, waiting=False):
    """pg_terminate_backend on the session running the marked statement, as soon as it runs (waiting: once it
    waits for a lock)."""
    while not stop.is_set():
        rows = q(admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE state = 'active'"
                            " AND query LIKE %s AND pid <> pg_backend_pid()" + (" AND wait_event_type = 'Lock'"
                                                                               if waiting else ""),
                 ("%" + MARKER.decode() + "%",))
        if rows:
            return
        time.sleep(0.05)


def _check_common(msg, url):
    assert "SQLSTATE ?" not in msg and "SQLSTATE None" not in msg, msg
    first = msg.splitlines()[0]
    assert first.startswith("migration of 0002 failed on ") and "0002_slow.sql line 2" in first, msg
    # libpq's own words: with the server's FATAL line first when it read it before the close
    # (a terminated session, on a loaded machine either way), else only the close.
    assert re.search(r"no SQLSTATE: the connection to the server was lost \((FATAL: terminating connection due "
                     r"to administrator command )?server closed the connection unexpectedly\)", first), msg
    # The state found afterwards: 0002 rolled back, 0001 (this run) stays; one outcome per migration.
    assert history(url) == ["0001"]
    assert q(url, "SELECT to_regclass('public.lost_probe')") == [(None,)]
    outcomes = [(e[1], e[2]) for e in events(url, "apply")]
    assert outcomes == [("0001", "ok"), ("0002", "failed")], outcomes
    detail = events(url, "apply")[-1][3]
    assert detail["sqlstate"] is None and detail["connection_lost"]["cause"] in ("terminated", "dropped")
    return detail["connection_lost"]


def test_a_terminated_session_says_no_sqlstate_why_and_what_is_left(tmp_path, pg_cluster, empty_db):
    d = _set(tmp_path, 30)
    stop = threading.Event()
    killer = threading.Thread(target=_terminate_when_running, args=(pg_cluster.url(), stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(LedgerError) as exc:
            engine.apply(empty_db, load(d), advice=PlaybookAdvice("testenv"))
    finally:
        stop.set()
        killer.join(10)
    msg = exc.value.msg
    found = _check_common(msg, empty_db)
    assert found["cause"] == "terminated" and found["ended"] is True
    assert "was terminated (pg_terminate_backend" in msg and "57P01" in msg, msg
    assert "the migration was rolled back (one transaction: nothing of 0002_slow.sql is applied); found after" \
        " reconnecting: the session that ran it has ended" in msg, msg
    assert "This probably means the server terminated abnormally" not in msg  # libpq's guess, wrong here
    nxt = msg.splitlines()[-1]
    assert nxt.startswith("  next: find out why the connection to the target was lost (above), then re-run "
                          "`ansible-playbook playbooks/migrate.yml -l testenv`"), nxt
    assert exc.value.fields["sqlstate"] is None and exc.value.fields["connection_lost"]["cause"] == "terminated"
    assert msg.count("no SQLSTATE") == 1


def test_a_dropped_connection_waits_for_the_old_session_then_says_what_is_true(tmp_path, pg_cluster, empty_db):
    proxy = DroppingProxy(pg_cluster.port, drop="marked")
    try:
        via = _through(proxy, empty_db)
        d = _set(tmp_path, 2)
        started = time.monotonic()
        with pytest.raises(LedgerError) as exc:
            engine.apply(via, load(d), advice=PlaybookAdvice("testenv"))
        assert proxy.fired.is_set()
    finally:
        proxy.close()
    msg = exc.value.msg
    found = _check_common(msg, empty_db)
    # The server session ran on (the client side alone was cut); the engine waited for it to end.
    assert found["cause"] == "dropped" and found["ended"] is True, found
    assert time.monotonic() - started >= 2
    assert "was still running when the engine reconnected: the connection was cut between the engine and the" \
        " server" in msg and "it ended " in msg, msg
    assert "; found after reconnecting: the session that ran it has ended" in msg


def test_a_session_still_running_is_named_with_the_command_that_ends_it(tmp_path, pg_cluster, empty_db, monkeypatch):
    monkeypatch.setitem(ledger_runner.DEFAULTS, "commit_settle_s", 1.0)  # not the 120 s an operator waits
    proxy = DroppingProxy(pg_cluster.port, drop="marked")
    try:
        via = _through(proxy, empty_db)
        d = _set(tmp_path, 60)
        with pytest.raises(LedgerError) as exc:
            engine.apply(via, load(d), advice=PlaybookAdvice("testenv"))
    finally:
        proxy.close()
    msg = exc.value.msg
    found = exc.value.fields["connection_lost"]
    assert found["cause"] == "dropped" and found["ended"] is False, found
    pid = found["pid"]
    assert "it is still running after" in msg
    assert "no COMMIT was sent: nothing of it is committed and it never will be" in msg
    assert "still holds its locks until it ends: `SELECT pg_terminate_backend(%s)`" % pid in msg
    assert msg.splitlines()[-1].startswith("  next: end the old session first (`SELECT pg_terminate_backend(%s)`)"
                                           % pid)
    # It is true: the old session is there; ending it leaves nothing of 0002.
    assert q(pg_cluster.url(), "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    assert history(empty_db) == ["0001"]


# A no-transaction file whose CREATE INDEX CONCURRENTLY may finish on the server after its connection is lost:
# what it left is read once its session has ended, not guessed ("it may have completed").
def _index_set(tmp_path):
    return write_set(tmp_path / "m", {
        "0001_t.sql": "CREATE TABLE public.lost_t (a int);\nINSERT INTO public.lost_t SELECT generate_series(1, 100);\n",
        "0002_idx.sql": "-- ledger:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS %s_idx ON public.lost_t (a);\n"
                        % MARKER.decode(),
    })


def _lost_while_blocked(url, migrations, proxy):
    """engine.apply with the no-transaction file's statement cut from its client (the proxy is its
    migrate_direct_url) while a writer's open transaction keeps it waiting; the writer ends once the cut is
    made, so the statement finishes on the server after the cut, never before. The LedgerError raised."""
    writer = psycopg2.connect(url)
    with writer.cursor() as cur:
        cur.execute("INSERT INTO public.lost_t VALUES (0)")  # CONCURRENTLY waits for this transaction

    def end_writer():
        proxy.fired.wait(120)
        writer.rollback()

    ender = threading.Thread(target=end_writer, daemon=True)
    ender.start()
    try:
        with pytest.raises(LedgerError) as exc:
            engine.apply(url, migrations, advice=PlaybookAdvice("testenv"), direct_url=_through(proxy, url))
        assert proxy.fired.is_set()
        return exc.value
    finally:
        proxy.fired.set()
        ender.join(10)
        writer.close()
        proxy.close()


def test_a_lost_concurrent_index_build_that_finished_says_so(tmp_path, pg_cluster, empty_db):
    """The client side is cut right after the CREATE INDEX CONCURRENTLY is sent; the server builds the index,
    then finds its client gone."""
    d = _index_set(tmp_path)
    engine.apply(empty_db, load(d), target="0001")
    exc = _lost_while_blocked(empty_db, load(d), DroppingProxy(pg_cluster.port, drop="marked"))
    msg, index = exc.msg, "public.%s_idx" % MARKER.decode()
    found = exc.fields["connection_lost"]
    assert found["ended"] is True and found["effect"] == {
        "index": index, "state": "valid", "said": "it completed: the index %s exists and is valid" % index}, found
    assert ("the statement at line 2 of 0002_idx.sql ran outside a transaction: found after reconnecting: it "
            "completed: the index %s exists and is valid" % index) in msg, msg
    assert "may have completed" not in msg and msg.count("no SQLSTATE") == 1
    assert q(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (index,)) == [(True,)]
    assert history(empty_db) == ["0001"]  # no history row: the re-run below finds the index there
    assert [a["version"] for a in engine.apply(empty_db, load(d))["applied"]] == ["0002"]


def _terminated_while_waiting(url, migrations, pg_cluster, table):
    """engine.apply with the no-transaction file's CONCURRENTLY statement terminated while it waits for a writer's
    open transaction on ``table`` (its first phase committed by then). The LedgerError raised."""
    writer = psycopg2.connect(url)
    stop = threading.Event()
    killer = threading.Thread(target=_terminate_when_running, args=(pg_cluster.url(), stop, True), daemon=True)
    try:
        with writer.cursor() as cur:
            cur.execute("INSERT INTO %s VALUES (0)" % table)  # open: the statement waits for it to end
        killer.start()
        with pytest.raises(LedgerError) as exc:
            engine.apply(url, migrations, advice=PlaybookAdvice("testenv"))
        return exc.value
    finally:
        stop.set()
        killer.join(10)
        writer.rollback()
        writer.close()


def test_a_concurrent_index_drop_terminated_while_it_waits_says_it_left_the_index_invalid(
        tmp_path, pg_cluster, empty_db):
    """A quoted, schema-qualified name, read as the server reads it: the drop's first phase (the index marked
    INVALID) is committed, then it waits for a writer and its session is terminated."""
    name = "%s Idx" % MARKER.decode()
    index = '"Led ger"."%s"' % name
    d = write_set(tmp_path / "m", {
        "0001_t.sql": 'CREATE SCHEMA "Led ger";\nCREATE TABLE "Led ger".lost_t (a int);\n'
                      'CREATE INDEX "%s" ON "Led ger".lost_t (a);\n' % name,
        "0002_drop.sql": "-- ledger:no-transaction\nDROP INDEX CONCURRENTLY IF EXISTS %s;\n" % index,
    })
    engine.apply(empty_db, load(d), target="0001")
    exc = _terminated_while_waiting(empty_db, load(d), pg_cluster, '"Led ger".lost_t')
    found = exc.fields["connection_lost"]
    assert found["cause"] == "terminated" and found["effect"]["state"] == "invalid", found
    assert ("found after reconnecting: it did not complete: it left the index %s INVALID" % index) in exc.msg
    assert exc.fields["cleanup_sql"] == "DROP INDEX CONCURRENTLY IF EXISTS %s;" % index
    assert q(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (index,)) == [(False,)]


def test_a_concurrent_index_build_terminated_while_it_waits_says_the_index_is_left_invalid(
        tmp_path, pg_cluster, empty_db):
    """A transaction that wrote to the table keeps the build waiting (its first phase is committed: the index
    exists, INVALID); the build's session is then terminated."""
    d = _index_set(tmp_path)
    engine.apply(empty_db, load(d), target="0001")
    exc = _terminated_while_waiting(empty_db, load(d), pg_cluster, "public.lost_t")
    msg, index = exc.msg, "public.%s_idx" % MARKER.decode()
    found = exc.fields["connection_lost"]
    assert found["cause"] == "terminated" and found["effect"]["state"] == "invalid", found
    assert ("found after reconnecting: it did not complete: it left the index %s INVALID (unused by queries: the "
            "cleanup above)" % index) in msg, msg
    assert "DROP INDEX CONCURRENTLY IF EXISTS %s;" % index in msg
    assert exc.fields["cleanup_sql"] == "DROP INDEX CONCURRENTLY IF EXISTS %s;" % index
    assert q(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (index,)) == [(False,)]
