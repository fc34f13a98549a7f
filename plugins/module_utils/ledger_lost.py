# -*- coding: utf-8 -*-
"""What is true after the connection to the target was lost in the middle of a migration.

A lost connection has no SQLSTATE: libpq reports "server closed the connection unexpectedly".
For a session ended with pg_terminate_backend, PostgreSQL does send FATAL 57P01 before closing,
but libpq's PQexec (what psycopg2 2.9 runs a statement with) keeps only its last result, the
lost connection, so 57P01 never reaches the engine. The truth is found afterwards instead, on a
new connection: whether the server restarted (pg_postmaster_start_time), whether the session
that ran the migration is still there (pg_stat_activity lists every pid to every role), and
then, once that session has ended, what the history says. A session still running means the
client side alone was cut (network, proxy, firewall): it holds the migration's locks until it
notices, and a transaction it ran is rolled back then, never committed (no COMMIT was sent).
"""

from __future__ import annotations

import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, lost_connection_text
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import concurrent_index

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None


def server_start(conn):
    """pg_postmaster_start_time() as text: read when the run connects, compared after a lost connection."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_postmaster_start_time()::text")
        return cur.fetchone()[0]


def find_out(reconnect, pid, started_before, settle_s, wait_gone):
    """The facts after a lost connection, read on a new one.

    reconnect() opens the new connection (and returns it) or raises LedgerError; pid is the lost
    session's backend pid; started_before the server's start time read when the run connected
    (server_start: another one now means a restart ended every session); wait_gone(conn, pid,
    timeout) waits for that session to end.
    Returns {"cause": restart|terminated|dropped|unreachable, "pid", "ended", "waited_s", "error"}.
    """
    facts = {"cause": None, "pid": pid, "ended": None, "waited_s": 0.0, "error": None, "restarted_at": None}
    try:
        conn = reconnect()
    except LedgerError as exc:
        facts.update(cause="unreachable", error=exc.msg)
        return facts
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_postmaster_start_time()::text <> %s,"
                        " to_char(pg_postmaster_start_time() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS UTC'),"
                        " EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = %s)",
                        (started_before, pid or 0))
            restarted, started_at, alive = cur.fetchone()
        if restarted and started_before is not None:
            facts.update(cause="restart", ended=True, restarted_at=started_at)
        elif not alive:
            facts.update(cause="terminated", ended=True)
        else:
            t0 = time.monotonic()
            facts.update(cause="dropped", ended=wait_gone(conn, pid, settle_s))
            facts["waited_s"] = round(time.monotonic() - t0, 1)
    except psycopg2.Error as exc:
        facts.update(cause="unreachable", error=" ".join(str(exc).split()))
    return facts


# What a lost CREATE/DROP INDEX CONCURRENTLY left, by (action, state of the index found after reconnecting).
_EFFECT = {
    ("create", "valid"): "it completed: the index %s exists and is valid",
    ("create", "invalid"): "it did not complete: it left the index %s INVALID (unused by queries: the cleanup above)",
    ("create", "absent"): "it did not complete: there is no index %s",
    ("create", "elsewhere"): "it built nothing: the name %s belongs to an index of another table",
    ("drop", "absent"): "it completed: the index %s is gone",
    ("drop", "valid"): "it did not complete: the index %s is still there and valid",
    ("drop", "invalid"): "it did not complete: it left the index %s INVALID (unused by queries: the cleanup above)",
}


def effect(conn, stmt):
    """What a lost no-transaction statement did, read once its session has ended: for a named CREATE or
    DROP INDEX CONCURRENTLY, {"index" (as SQL writes it), "state": valid|invalid|absent|elsewhere, "said"};
    None for any other statement (its effect is not inspected) or when the catalog can't be read. An
    unqualified name is looked up with this connection's search_path (the statement's own may differ when it
    ran on migrate_direct_url as another role): schema-qualified names are read exactly."""
    target = concurrent_index(stmt)
    if target is None:
        return None
    if target["table"] is not None:
        # The index lives in its table's schema; no table, no index.
        found = ("SELECT quote_ident(n.nspname) || '.' || quote_ident(%(index)s) AS name, i.indisvalid AS valid,"
                 " i.indrelid = t.oid AS on_table FROM pg_catalog.pg_class t"
                 " JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace"
                 " LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = t.relnamespace AND c.relname = %(index)s"
                 "      AND c.relkind IN ('i', 'I')"
                 " LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid"
                 " WHERE t.oid = pg_catalog.to_regclass(%(table)s)")
    else:
        found = ("SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name, i.indisvalid AS valid,"
                 " true AS on_table FROM pg_catalog.pg_class c"
                 " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                 " JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid"
                 " WHERE c.oid = pg_catalog.to_regclass(%(written)s)")
    try:
        with conn.cursor() as cur:
            # One row always: the name as the statement wrote it when the catalog has none (the server quotes).
            cur.execute("SELECT coalesce(x.name, %(written)s), x.valid, x.on_table FROM (SELECT 1) one"
                        " LEFT JOIN (" + found + ") x ON true",
                        {"index": target["index"], "table": target["table"],
                         "written": _written(cur, target["schema"], target["index"])})
            name, valid, on_table = cur.fetchone()
    except psycopg2.Error:
        return None
    if valid is None:
        state = "absent"
    elif not on_table:  # IF NOT EXISTS met an index of that name on another table
        state = "elsewhere"
    else:
        state = "valid" if valid else "invalid"
    return {"index": name, "state": state, "said": _EFFECT[(target["action"], state)] % name}


def _written(cur, schema, name):
    """schema.name (or name) quoted by the server's quote_ident (reserved words included)."""
    cur.execute("SELECT CASE WHEN %s::text IS NULL THEN '' ELSE quote_ident(%s) || '.' END || quote_ident(%s)",
                (schema, schema, name))
    return cur.fetchone()[0]


def header(message):
    """The failure's first line instead of `SQLSTATE ?: ...`."""
    return lost_connection_text(message)


def cause(facts):
    """One line: why the connection was lost, as far as the server tells."""
    pid = facts.get("pid")
    if facts["cause"] == "restart":
        return "the server restarted at %s (a crash or a restart ends every session)" % facts["restarted_at"]
    if facts["cause"] == "terminated":
        return ("its server session (pid %s) had already ended when the engine reconnected and the server did not "
                "restart: the session was terminated (pg_terminate_backend or an administrator's command; "
                "PostgreSQL sends SQLSTATE 57P01 then, but libpq does not pass it on through the closed connection), "
                "or the connection was cut and the session ended when it next wrote to its client" % pid)
    if facts["cause"] == "dropped":
        state = ("it ended %ss later" % facts["waited_s"] if facts["ended"] else
                 "it is still running after %ss" % facts["waited_s"])
        return ("its server session (pid %s) was still running when the engine reconnected: the connection was cut "
                "between the engine and the server (network, proxy, firewall); %s" % (pid, state))
    return "the target could not be reached again to find out why: %s" % facts.get("error")


def state(facts, advice, transactional, filename, line=None):
    """The state the database is left in, as found after reconnecting (advice: what the caller says of it)."""
    pid = facts.get("pid")
    if transactional:
        if facts["ended"]:
            return "%s; found after reconnecting: the session that ran it has ended" % advice
        if facts["cause"] == "unreachable":
            return ("no COMMIT was sent, so the server rolls it back (%s), but the target could not be read again to "
                    "confirm it" % advice)
        return ("no COMMIT was sent: nothing of it is committed and it never will be (%s), but its session (pid %s) "
                "still holds its locks until it ends: `SELECT pg_terminate_backend(%s)`" % (advice, pid, pid))
    where = "line %s of %s" % (line, filename) if line else filename
    if facts["ended"] and facts.get("effect"):
        said = "found after reconnecting: %s" % facts["effect"]["said"]
    elif facts["ended"]:
        said = "it may have completed on the server before its session ended; check its effect before re-running"
    else:
        said = ("its session (pid %s) %s: it may still complete; check its effect once it has ended"
                % (pid, "may still be running" if facts["cause"] == "unreachable" else "is still running"))
    return "%s\n  the statement at %s ran outside a transaction: %s" % (advice, where, said)
