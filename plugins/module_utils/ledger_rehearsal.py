# -*- coding: utf-8 -*-
"""Rehearsal: pending files run for real in ONE transaction that is rolled back."""

from __future__ import annotations

import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    connect,
    log_event_autonomous,
    new_run_id,
    pg_error,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - connect() reports it
    psycopg2 = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_impact import Profiler
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import elapsed_ms, safe_rollback
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_runner import RETRIABLE, backoff, error_line, run_settings, set_timeouts
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import rehearsal_form

# =========================================================================== rehearsal


def rehearse(url, pending, lock_timeout=None, statement_timeout=None, lock_retries=None, retry_backoff=None,
             run_id=None, record_event=False, rehearse_concurrently=True, conn=None, profile=True,
             stop_before=None):
    """Run ``pending`` for real in ONE transaction that is rolled back; report per file.

    Files run in order, one savepoint each, so each sees the objects of the ones
    before it. Nothing is written (the transaction is rolled back; no records
    schema is created), except that sequences advanced by a rehearsal stay
    advanced (PostgreSQL never rolls back nextval). With ``record_event=True`` (the
    rehearsal of a real run, e.g. precheck) one ``rehearse`` event is appended
    afterwards; a ``--check`` run leaves it False and writes nothing at all.

    Non-transactional files (``-- ledger:no-transaction``) are rehearsed as far as
    possible: CONCURRENTLY index operations run without CONCURRENTLY (the plain
    form is allowed in a transaction; note it takes a SHARE lock, blocking writes
    to the table for the build, bounded by lock_timeout to acquire it); VACUUM,
    CREATE DATABASE and the like are listed in ``skipped_statements``. With
    ``rehearse_concurrently=False`` the CONCURRENTLY statements are skipped too.

    A lock timeout (55P03) rolls the whole rehearsal back (releasing every lock it
    took) and retries it after a back-off, up to ``lock_retries`` times.

    ``conn``: an optional open connection to use instead of ``url`` (left open, in its
    autocommit mode; a transaction open on it is rolled back first).

    ``profile``: record each file's impact profile (``impact``: per statement the locks
    newly held on pre-existing relations, rewrites, rows, ms; module_utils/ledger_impact.py)
    and its ``allow_lock`` tables. ``stop_before``: {(filename, line): reason} of statements
    never to run here (production's precheck: staging measured them as heavy); the rest of
    that file and the later files are then not rehearsed either (they may depend on it).

    Returns a list, one dict per file, in order: version, filename, status
    (``would_apply`` | ``would_fail`` | ``not_rehearsed``), duration_ms,
    skipped_statements, notices; a would_fail also has sqlstate, message, detail,
    hint, file, line, statement. Connection failures raise LedgerError.
    """
    s = run_settings({"lock_timeout": lock_timeout, "statement_timeout": statement_timeout,
                      "lock_retries": lock_retries, "retry_backoff": retry_backoff})
    pending = list(pending)
    own = conn is None
    if own:
        conn = connect(url, autocommit=True)
    t0 = time.monotonic()
    try:
        attempt = 0
        while True:
            results, retry = _rehearse_once(conn, pending, s, rehearse_concurrently,
                                            Profiler() if profile else None, stop_before or {})
            if not retry or attempt >= s["lock_retries"]:
                break
            time.sleep(backoff(s, attempt))
            attempt += 1
    finally:
        if own:
            conn.close()
    if record_event and pending:
        failed = [r for r in results if r["status"] == "would_fail"]
        log_event_autonomous(url, run_id or new_run_id(), "rehearse", "failed" if failed else "ok",
                             version=failed[0]["version"] if failed else pending[-1].version,
                             duration_ms=elapsed_ms(t0),
                             detail={"results": [dict((k, r.get(k)) for k in
                                                      ("version", "filename", "status", "sqlstate", "line",
                                                       "message")) for r in results],
                                     "attempts": attempt + 1})
    return results


def _rehearse_once(conn, pending, s, rehearse_concurrently, profiler=None, stop_before=None):
    results = []
    stopped = None
    was_autocommit = conn.autocommit
    if not was_autocommit:
        conn.rollback()  # start from a clean transaction: the rehearsal rolls everything back
    conn.autocommit = False
    failed = False
    retry = False
    done = False
    try:
        with conn.cursor() as cur:
            set_timeouts(cur, s)
            for m in pending:
                if failed or stopped:
                    results.append({"version": m.version, "filename": m.filename, "status": "not_rehearsed",
                                    "reason": stopped or "an earlier migration would fail"})
                    continue
                res = {"version": m.version, "filename": m.filename, "status": "would_apply",
                       "transactional": m.transactional, "skipped_statements": [], "notices": []}
                if profiler is not None:
                    res.update(impact=[], allow_lock=list(getattr(m, "allow_lock", ()) or ()))
                t1 = time.monotonic()
                del conn.notices[:]
                if profiler is not None and not results:
                    # What exists before the migrations, read in the first savepoint's round trip.
                    profiler.start(cur, [st for f in pending for st in f.statements],
                                   run_first="SAVEPOINT ledger_rehearsal")
                else:
                    cur.execute("SAVEPOINT ledger_rehearsal")
                stmt = None
                try:
                    for stmt in m.statements:
                        why = stop_before.get((m.filename, stmt.line))
                        if why:
                            stopped = ("%s line %d: %s; not rehearsed on this target (the rehearsal must not stall it)"
                                       % (m.filename, stmt.line, why))
                            res.update(status="not_rehearsed", reason=stopped, stopped_at=stmt.line)
                            stopped = "follows %s line %d, not rehearsed here" % (m.filename, stmt.line)
                            break
                        if profiler is not None and not m.transactional:
                            # Its rehearsal form (no CONCURRENTLY) would lock otherwise than the real run.
                            res["impact"].append(profiler.documented(stmt))
                        text, note = rehearsal_form(stmt)
                        if note and (text is None or not rehearse_concurrently):
                            res["skipped_statements"].append({"line": stmt.line, "statement": stmt.summary(80),
                                                              "reason": note if text is None else
                                                              "CONCURRENTLY: not rehearsed"})
                            continue
                        if note:
                            res.setdefault("notes", []).append("line %d: %s" % (stmt.line, note))
                        if profiler is not None and m.transactional:
                            res["impact"].append(profiler.execute(cur, stmt, text))
                        else:
                            cur.execute(text)
                    if profiler is not None and not m.transactional:
                        # Its entries are the documented ones; what its rehearsal form locked is
                        # taken in, so that the next file's statements are not charged with it.
                        profiler.catch_up(cur)
                    cur.execute("RELEASE SAVEPOINT ledger_rehearsal")
                except psycopg2.Error as exc:
                    err = pg_error(exc)
                    if conn.closed or exc.pgcode is None:
                        raise LedgerError("the connection was lost during the rehearsal of %s: %s"
                                          % (m.filename, err["message"]), file=m.filename)
                    cur.execute("ROLLBACK TO SAVEPOINT ledger_rehearsal")
                    res.update({"status": "would_fail", "sqlstate": err["sqlstate"], "message": err["message"],
                                "detail": err["detail"], "hint": err["hint"], "file": m.filename,
                                "file_path": m.path, "line": error_line(stmt, err),
                                "statement": stmt.summary()})
                    if err["sqlstate"] in RETRIABLE:
                        retry = True
                    failed = True
                res["duration_ms"] = elapsed_ms(t1)
                res["notices"] = [n.strip() for n in conn.notices][-20:]
                results.append(res)
        done = True
    finally:
        safe_rollback(conn)
        if not conn.closed:
            if done and profiler is not None:
                _finish_profile(conn, profiler)
            conn.autocommit = was_autocommit
    return results, retry


def _finish_profile(conn, profiler):
    """The profile's last facts, read from the catalog as committed: as it was before the rehearsal."""
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            profiler.finish(cur)
    except psycopg2.Error as exc:
        raise LedgerError("the connection was lost after the rehearsal, completing its impact profile: %s"
                          % pg_error(exc)["message"])


def format_rehearsal(results):
    """Human lines for a rehearsal: `0010_x.sql: would apply` / `... would fail at line 7: SQLSTATE ...`."""
    lines = []
    for r in results:
        if r["status"] == "would_apply":
            extra = ""
            if r.get("skipped_statements"):
                extra = " (%d statement(s) not rehearsed: %s)" % (
                    len(r["skipped_statements"]), "; ".join("line %d %s" % (x["line"], x["reason"])
                                                            for x in r["skipped_statements"]))
            lines.append("%s: would apply (%d ms)%s" % (r["filename"], r.get("duration_ms", 0), extra))
        elif r["status"] == "would_fail":
            line = "%s: would fail at line %s: SQLSTATE %s: %s" % (r["filename"], r["line"], r["sqlstate"],
                                                                   r["message"])
            if r.get("hint"):
                line += " (hint: %s)" % r["hint"]
            lines.append(line)
        else:
            lines.append("%s: not rehearsed (%s)" % (r["filename"], r.get("reason", "")))
    return lines
