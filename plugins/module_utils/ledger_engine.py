# -*- coding: utf-8 -*-
"""The migration engine: history, checksums, lease, timeouts, rehearsal and honest failure.

The core of a small engine with parts around it, one concern per file:
ledger_sql (statement splitting), ledger_migration_set (the file-name rule, checksums,
down scripts), ledger_records (history, drift, the lease), ledger_runner (settings,
one transaction per file, retries), ledger_rehearsal, ledger_revert; this file holds
apply, baseline and accept_checksum (status is in ledger_records).

Public API (stable: the modules call it; keep names and signatures):

    load_migration_set(directory)                       -> MigrationSet (a list of Migration)
    split_sql(text)                                     -> list of Statement
    inspect(conn_or_url, migrations, target=None, allow_out_of_order=False) -> dict
    plan_problems(info)                                 -> list of str (drift, order, target)
    rehearse(url, pending, **settings)                  -> list of per-file result dicts
    apply(url, migrations, **settings)                  -> result dict (raises LedgerError on failure)
    revert(url, migrations, to_version, before_down=None, **settings) -> result dict (raises LedgerError)
    baseline(url, migrations, version, **settings)      -> result dict
    accept_checksum(url, migrations, version, **settings) -> result dict
    status(url, migrations, target=None, ...)           -> dict (read-only)
    nontx_route_problem(url, pending, direct_url=None)  -> LedgerError or None (read-only)
    connection_route(conn, url)                         -> dict: client_port, server_port, pooled
    format_rehearsal(results)                           -> list of str

Every failure is a LedgerError whose ``fields`` carry the structured result
(target, file, line, sqlstate, message, hint, next_command, ...). The next command
is asked of the ``advice`` the caller passes (an Advice; the modules pass
ledger_next.PlaybookAdvice): the core never names a playbook. Nothing here
prints or raises a bare traceback for a PostgreSQL error; no message carries a
password (URLs are shown through describe_target()).

Design (see roles/migrate/README.md for the operator's view):

* One transaction per migration: ``SET LOCAL`` timeouts, ``SELECT ... FOR UPDATE``
  of the lease row, the file's statements, its ``migrations.history`` row, its
  ``migrations.events`` row and the lease renewal commit together or not at all.
* Mutual exclusion without session state (PgBouncer transaction pooling): a lease
  row ``migrations.lock`` (id = 1) holding run id, holder and expiry; ownership is
  a token unique to each Lease object (every host of one playbook run shares the
  run id). It is taken in a short transaction when absent or expired, renewed by a
  heartbeat thread and at the end of every migration transaction, row-locked
  inside every migration transaction (so a lease that expired during a long
  migration can't be stolen while that migration runs; a no-transaction file has
  no transaction to hold it and relies on the heartbeat), and deleted at the end.
  Waiters poll with ``FOR UPDATE NOWAIT`` and sleep outside any transaction: a
  waiter never holds a snapshot, so it can never block a ``CREATE INDEX
  CONCURRENTLY`` of the holder.
* Session state: transactional files may only SET LOCAL (plain SET/RESET is
  refused when the set is read); no-transaction files run on a connection of
  their own (direct_url when set; refused through a detected pooler), reset and
  closed after the file.
* A killed runner: its transaction dies with its connection (the server notices
  promptly through ``client_connection_check_interval``), and its lease expires
  after ``lock_ttl`` seconds (the next run waits for the expiry and reports the
  dead holder and its age).
* Rehearsal: all pending files, in order, inside ONE transaction that is rolled
  back, one savepoint per file; nothing is written (not even the records schema).
"""

from __future__ import annotations

import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    actor,
    log_event,
    pg_error,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - connect() reports it
    psycopg2 = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import VERSION_RE
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import (
    elapsed_ms,
    inspect,
    plan_problems,
    safe_rollback,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_runner import (
    COMMIT_SETTLE_SECONDS,
    CommitUnknown,
    RETRIABLE,
    Runner,
    StepFailed,
    error_line,
    invalid_indexes,
    named_in,
    one_line,
    reset_session,
    run_in_tx,
    run_settings,
    set_timeouts,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import rehearsal_form

# The rest of the public API lives in the engine's parts; callers import it from here.
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import (
    load_migration_set,
    parse_filename,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import (
    Lease,
    read_history,
    status,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rehearsal import (
    format_rehearsal,
    rehearse,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_revert import revert
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_runner import connection_route
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import (
    SqlSyntaxError,
    split_sql,
)


# The public API (see the docstring): what callers import from here.
__all__ = [
    "LedgerError", "Lease", "SqlSyntaxError", "accept_checksum", "apply", "baseline", "connection_route",
    "format_rehearsal", "inspect", "load_migration_set", "nontx_route_problem", "parse_filename", "plan_problems",
    "read_history", "rehearsal_form", "rehearse", "revert", "split_sql", "status",
]


# =========================================================================== apply

def apply(url, migrations, target=None, run_id=None, advice=None, allow_out_of_order=False, lock_timeout=None,
          statement_timeout=None, lock_retries=None, retry_backoff=None, lock_wait=None, lock_ttl=None,
          connection_check=None, direct_url=None):
    """Apply the pending migrations of ``migrations`` (up to ``target``) to the database at ``url``.

    Order of work: a read-only inspection (nothing pending: return at once, no
    write at all, changed False); refusal before any change on drift, out-of-order
    files or an unusable target (with a failure event when the records exist); the
    records schema; the lease (waiting up to ``lock_wait`` s); a second inspection
    under the lease; then each migration:

    * transactional: one transaction holding ``SET LOCAL lock_timeout /
      statement_timeout / client_connection_check_interval``, the lease row lock,
      the statements, the history row, the ``apply`` event and the lease renewal;
      a lock timeout or deadlock rolls it back and retries it after
      ``retry_backoff * 2^n`` s (jittered) up to ``lock_retries`` times (each retry
      is a ``lock_wait`` event);
    * ``-- ledger:no-transaction``: statement by statement in autocommit on a
      connection of its own (session timeouts; RESET ALL and closed afterwards), then
      the history row and event in one short transaction. That connection goes to
      ``direct_url`` when given (checked to reach the same database), else to ``url``,
      which must then not go through a pooler (see connection_route()): through
      PgBouncer such files are refused before any change. Refused first if an INVALID
      index named in the file exists; on failure the INVALID indexes it left are
      reported with their cleanup SQL.

    ``lock_wait`` defaults to ``lock_ttl + 30`` s, so a run started right after a
    runner was killed outwaits the dead run's lease.

    Returns {changed, applied: [{version, name, filename, execution_ms, attempts,
    transactional}], pending: [], above_target: [versions above the target], version_before,
    version_after, run_id, target, lock: {waited_s, takeover}, msg}. Raises
    LedgerError with fields (target, version, file, line, sqlstate, message, hint,
    statement, applied, next_command, ...) on any failure: the failed migration is
    rolled back (or, non-transactional, reported with what it left) and its
    ``apply`` event with outcome ``failed`` is written on its own connection.
    """
    s = run_settings({"lock_timeout": lock_timeout, "statement_timeout": statement_timeout,
                      "lock_retries": lock_retries, "retry_backoff": retry_backoff, "lock_wait": lock_wait,
                      "lock_ttl": lock_ttl, "connection_check": connection_check})
    r = Runner(url, migrations, run_id, s, advice, "apply", direct_url=direct_url)
    t0 = time.monotonic()
    try:
        info = inspect(r.conn, migrations, target, allow_out_of_order, advice=r.advice)
        r.version_before = info["current"]
        _refuse(r, info)
        r.check_nontx_route([(m.version, m.filename) for m in info["pending"] if not m.transactional],
                            records=info["records"])
        base = {"changed": False, "applied": [], "pending": [], "above_target": info["above_target"],
                "version_before": info["current"], "version_after": info["current"], "run_id": r.run_id,
                "target": r.target, "target_version": info["target"], "drift": [], "lock": None}
        if not info["pending"]:
            base["msg"] = "%s is at %s: nothing to apply (target %s)" % (
                r.target, info["current"] or "no version", info["target"] or "none")
            return base
        r.take_lease()
        info = inspect(r.conn, migrations, target, allow_out_of_order, advice=r.advice)
        r.version_before = info["current"]
        _refuse(r, info)
        r.check_nontx_route([(m.version, m.filename) for m in info["pending"] if not m.transactional])
        for m in info["pending"]:
            if r.lease.lost is not None:
                raise LedgerError("this run lost its lease on %s (now held by: %s): stopped before %s"
                                  % (r.target, r.lease.lost, m.filename), target=r.target,
                                  applied=[d["version"] for d in r.done])
            if m.transactional:
                rec = _apply_tx(r, m)
            else:
                rec = _apply_nontx(r, m)
            r.done.append(rec)
        base.update({
            "changed": bool(r.done), "applied": r.done, "version_before": r.version_before,
            "version_after": r.done[-1]["version"] if r.done else info["current"],
            "lock": {"waited_s": r.lease.waited_s, "takeover": r.lease.takeover},
            "duration_ms": elapsed_ms(t0),
        })
        if r.done:
            base["msg"] = "applied %s to %s in %d ms (now at %s)" % (
                ", ".join(d["filename"] for d in r.done), r.target, base["duration_ms"], base["version_after"])
            if r.lease.waited_s >= 0.5:
                base["msg"] += "; waited %.1f s for the lease" % r.lease.waited_s
        else:
            base["msg"] = "%s is at %s: nothing to apply (another run applied them while this one waited)" % (
                r.target, info["current"] or "no version")
        if r.lease.takeover:
            t = r.lease.takeover
            base["msg"] += ("; took over the expired lease of run %s by %s (taken %ss ago, expired %ss ago)"
                            % (t["run_id"], t["holder"], t["age_s"], -t["expires_in_s"]))
        return base
    finally:
        r.close()


def _next_after_failure(r, filename, line, err=None, lost=False):
    """The next command after a failed migration: what to fix, then re-run, or how to go back."""
    rerun = r.advice.migrate()
    last_good = r.done[-1]["version"] if r.done else r.version_before
    code = (err or {}).get("sqlstate")
    if lost:
        found = lost if isinstance(lost, dict) else {}
        first = "find out why the connection to the target was lost (above), then re-run `%s`" % rerun
        if found.get("cause") == "dropped" and not found.get("ended"):
            first = "end the old session first (`SELECT pg_terminate_backend(%s)`), then %s" % (found["pid"], first)
    elif code in RETRIABLE:
        first = ("end or wait out the session(s) holding the lock (see 'likely blocker'), or raise"
                 " migrate_lock_timeout / migrate_lock_retries; then re-run `%s`" % rerun)
    elif code == "57014":
        first = ("raise migrate_statement_timeout (e.g. -e migrate_statement_timeout=30min) or make %s faster;"
                 " then re-run `%s`" % (filename, rerun))
    else:
        first = "fix %s%s and re-run `%s`" % (filename, " (line %s)" % line if line else "", rerun)
    if r.done:
        back = r.version_before or "base"
        return ("%s; the target is at %s (this run applied %s); or undo what this run applied with `%s`"
                % (first, last_good, ", ".join(d["version"] for d in r.done),
                   r.advice.rollback("-e rollback_to=%s" % back)))
    return ("%s; the target stays at %s (to go back further: `%s`)"
            % (first, last_good or "no version", r.advice.rollback("-e rollback_to=VERSION|base")))


def _refuse(r, info):
    problems = plan_problems(info)
    if not problems:
        return
    drift = info["drift"]
    if drift:
        nxt = ("restore the applied file(s) as they were, or accept an intended edit or rename with "
               "`%s` (roles/migrate/README.md); `%s` shows the drift"
               % (r.advice.accept_checksum(drift[0]["version"]), r.advice.status()))
    elif info["out_of_order"]:
        nxt = ("renumber the file(s) above %s, or allow it with -e migrate_allow_out_of_order=true"
               % info["current"])
    else:
        nxt = "choose a target among the set's versions (%s)" % r.advice.status()
    msg = "refusing to %s on %s before any change:\n  - %s\n  next: %s" % (
        r.action, r.target, "\n  - ".join(problems), nxt)
    if info["records"]:
        r.event(r.action, "refused", None, None, {"problems": problems, "drift": drift})
    raise LedgerError(msg, target=r.target, drift=drift, out_of_order=info["out_of_order"],
                      next_command=nxt, problems=problems)


def _history_insert(cur, r, m, ms, kind="apply"):
    cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_at, applied_by, execution_ms,"
                " run_id, kind) VALUES (%s, %s, %s, clock_timestamp(), %s, %s, %s, %s)",
                (m.version, m.name, m.checksum, actor(), ms, r.run_id, kind))


def _apply_tx(r, m):
    t0 = r.t_step = time.monotonic()

    def finish(cur, ms):
        cur.execute("SELECT 1 FROM migrations.history WHERE version = %s", (m.version,))
        if cur.fetchone():
            raise LedgerError("%s was recorded by another run meanwhile: stopped" % m.version, target=r.target)
        _history_insert(cur, r, m, ms)
        log_event(cur, r.run_id, "apply", "ok", m.version, ms,
                  {"filename": m.filename, "checksum": m.checksum, "statements": len(m.statements),
                   "lease": r.lease.token if r.lease is not None else None})

    def once():
        del r.conn.notices[:]
        return run_in_tx(r.conn, r.lease, r.s, m.statements, finish)

    try:
        ms, attempts = r.with_retries("apply", m.version, m.filename, once)
    except StepFailed as exc:
        r.recover(exc)
        nxt = _next_after_failure(r, m.filename, error_line(exc.stmt, exc.err) if exc.stmt else None, exc.err,
                                  exc.found or exc.lost)
        raise r.fail(m.version, m.filename, m.path, exc, "migration",
                     advice="the migration was rolled back (one transaction: nothing of %s is applied)" % m.filename,
                     next_command=nxt)
    except CommitUnknown as exc:
        # The truth first: the old backend may still be committing (a deferred trigger, synchronous
        # replication); only once it has ended does the history say whether the COMMIT happened.
        settled = r.settle_commit(exc)
        if _recorded(r, m.version):
            return {"version": m.version, "name": m.name, "filename": m.filename, "execution_ms": None,
                    "attempts": 1, "transactional": True,
                    "note": "connection lost during COMMIT; the commit is confirmed by the history"}
        if not settled:
            raise LedgerError(
                "migration of %s on %s: the connection was lost during COMMIT and the server session (pid %s) that"
                " ran it is still running after %ss: whether %s is applied is NOT known yet (nothing recorded by this"
                " run)\n  next: when that session has ended, `%s` shows whether %s is applied"
                % (m.version, r.target, exc.backend_pid, r.s.get("commit_settle_s", COMMIT_SETTLE_SECONDS),
                   m.filename, r.advice.status(), m.version),
                target=r.target, version=m.version, file=m.filename, outcome="unknown", backend_pid=exc.backend_pid,
                next_command=r.advice.status(), applied=[d["version"] for d in r.done])
        fake = StepFailed(exc.err, None)
        raise r.fail(m.version, m.filename, m.path, fake, "migration (commit)",
                     advice="the connection was lost during COMMIT; the session that ran it has ended and the"
                            " history has no row: not applied",
                     next_command=_next_after_failure(r, m.filename, None))
    notices = [n.strip() for n in r.conn.notices][-20:]
    return {"version": m.version, "name": m.name, "filename": m.filename, "execution_ms": ms,
            "attempts": attempts, "transactional": True, "duration_ms": elapsed_ms(t0), "notices": notices}


def _recorded(r, version):
    """Whether THIS runner committed ``version`` (after a connection lost during COMMIT).

    The run id alone can't tell: every host of one playbook run shares it. The apply
    event, committed in the same transaction as the history row, carries this
    runner's lease token.
    """
    token = r.lease.token if r.lease is not None else None
    try:
        with r.conn.cursor() as cur:
            cur.execute("SELECT EXISTS (SELECT 1 FROM migrations.history WHERE version = %s AND run_id = %s)"
                        " AND EXISTS (SELECT 1 FROM migrations.events WHERE action = 'apply' AND outcome = 'ok'"
                        "             AND version = %s AND run_id = %s AND detail->>'lease' = %s)",
                        (version, r.run_id, version, r.run_id, token))
            return bool(cur.fetchone()[0])
    except psycopg2.Error:
        return False


def _apply_nontx(r, m):
    """A ``-- ledger:no-transaction`` migration: statements in autocommit, then its record in one transaction."""
    t0 = r.t_step = time.monotonic()
    left = [i for i in invalid_indexes(r.conn) if named_in(m.statements, i["index"])]
    if left:
        cleanup = "\n    ".join(i["cleanup"] for i in left)
        msg = ("refusing to run %s on %s: INVALID index(es) named in the file exist, left by an earlier failed"
               " or killed CONCURRENTLY build: %s. Drop them first (they are not used by queries):\n    %s\n"
               "  next: run the cleanup SQL above, then `%s`"
               % (m.filename, r.target, ", ".join("%s.%s" % (i["schema"], i["index"]) for i in left), cleanup,
                  r.advice.migrate()))
        r.event("apply", "refused", m.version, None, {"filename": m.filename, "invalid_indexes": left})
        raise LedgerError(msg, target=r.target, version=m.version, file=m.filename, file_path=m.path,
                          invalid_indexes=left, cleanup_sql=cleanup, next_command="run the cleanup SQL, then re-run",
                          applied=[d["version"] for d in r.done])
    before = set((i["schema"], i["index"]) for i in invalid_indexes(r.conn))
    done_lines = []
    # A connection of its own (direct_url, else the database URL, never a pooler: see
    # check_nontx_route): session-level timeouts, then RESET ALL and closed after the file.
    nconn = r.nontx_conn()
    try:
        with nconn.cursor() as cur:
            set_timeouts(cur, r.s, local=False)
        pid = nconn.get_backend_pid()
        t1 = time.monotonic()
        for stmt in m.statements:
            def once(stmt=stmt):
                try:
                    with nconn.cursor() as cur:
                        cur.execute(stmt.text)
                except psycopg2.Error as exc:
                    if exc.pgcode is None or nconn.closed:
                        raise StepFailed(one_line(pg_error(exc)), stmt, lost=True, backend_pid=pid)
                    # A CONCURRENTLY build that timed out late leaves an INVALID index: never retry over it.
                    left = any((i["schema"], i["index"]) not in before for i in invalid_indexes(r.conn))
                    raise StepFailed(one_line(pg_error(exc)), stmt, no_retry=left)
            try:
                _unused, attempts = r.with_retries("apply", m.version, m.filename, once)
            except StepFailed as exc:
                r.recover(exc)
                new = [i for i in invalid_indexes(r.conn) if (i["schema"], i["index"]) not in before] \
                    if not r.conn.closed else []
                cleanup = "\n".join(i["cleanup"] for i in new)
                advice = "%s runs outside a transaction (-- ledger:no-transaction): %s" % (
                    m.filename, "the statement(s) before it (line(s) %s) were applied and stay" % ", ".join(
                        str(x) for x in done_lines) if done_lines else "no statement of it ran before this one")
                if new:
                    advice += ("\n  it left INVALID index(es) %s; clean up with:\n    %s" % (
                        ", ".join("%s.%s" % (i["schema"], i["index"]) for i in new),
                        "\n    ".join(i["cleanup"] for i in new)))
                advice += ("\n  no history row was recorded: a re-run runs the whole file again (keep it re-runnable:"
                           " CREATE INDEX CONCURRENTLY IF NOT EXISTS ...)")
                nxt = _next_after_failure(r, m.filename, error_line(exc.stmt, exc.err), exc.err, exc.found or exc.lost)
                if new:
                    nxt = "run the cleanup SQL (%s), then %s" % (" ".join(i["cleanup"] for i in new), nxt)
                raise r.fail(m.version, m.filename, m.path, exc, "non-transactional migration",
                             extra={"invalid_indexes": new, "cleanup_sql": cleanup or None,
                                    "statements_applied": done_lines, "transactional": False},
                             advice=advice, next_command=nxt)
            done_lines.append(stmt.line)
        notices = [n.strip() for n in nconn.notices][-20:]
    finally:
        reset_session(nconn)
        if not nconn.closed:
            nconn.close()
    ms = elapsed_ms(t1)

    def finish(cur, _ms_unused):
        _history_insert(cur, r, m, ms)
        log_event(cur, r.run_id, "apply", "ok", m.version, ms,
                  {"filename": m.filename, "checksum": m.checksum, "statements": len(m.statements),
                   "transactional": False, "lease": r.lease.token if r.lease is not None else None})

    try:
        r.with_retries("record", m.version, m.filename, lambda: run_in_tx(r.conn, r.lease, r.s, [], finish))
    except StepFailed as exc:
        raise r.fail(m.version, m.filename, m.path, exc, "recording",
                     advice="its statements were applied but its history row could not be written; re-running"
                            " runs the (re-runnable) file again",
                     next_command=r.advice.migrate())
    return {"version": m.version, "name": m.name, "filename": m.filename, "execution_ms": ms, "attempts": 1,
            "transactional": False, "duration_ms": elapsed_ms(t0), "notices": notices}


def nontx_route_problem(url, pending, direct_url=None, advice=None, action="apply"):
    """Read-only: the LedgerError a real run would raise for the no-transaction files of ``pending``
    (Migration objects) through a pooler without ``direct_url``, or None. For rehearsals (--check)."""
    files = [(m.version, m.filename) for m in pending if not m.transactional]
    if not files:
        return None
    r = Runner(url, pending, "rehearsal", run_settings({}), advice, action, direct_url=direct_url)
    try:
        r.check_nontx_route(files, records=False)
    except LedgerError as exc:
        return exc
    finally:
        r.conn.close()
    return None


# =========================================================================== baseline, accept, status

def baseline(url, migrations, version, run_id=None, advice=None, check=False, lock_wait=None, lock_ttl=None):
    """Record an existing database as already at ``version`` without running any file.

    For a database migrated by hand with the runbook: every migration of the set up
    to ``version`` that is not recorded gets a history row (kind 'baseline',
    execution_ms 0, the file's current checksum) and one ``baseline`` event, in one
    transaction under the lease. Refuses when a version above ``version`` is
    already recorded or ``version`` is not in the set. ``check=True`` only reports.
    """
    s = run_settings({"lock_wait": lock_wait, "lock_ttl": lock_ttl})
    version = str(version or "")
    if not VERSION_RE.match(version):
        raise LedgerError("baseline_version must be a 4-digit version (got %r)" % version)
    by_version = dict((m.version, m) for m in migrations)
    if version not in by_version:
        raise LedgerError("baseline version %s is not in the migration set (%s)"
                          % (version, ", ".join(by_version) or "empty"))
    r = Runner(url, migrations, run_id, s, advice, "baseline")
    try:
        info = inspect(r.conn, migrations)
        above = [a["version"] for a in info["applied"] if a["version"] > version]
        if above:
            raise LedgerError("refusing to baseline %s at %s: %s already recorded above it"
                              % (r.target, version, ", ".join(above)), target=r.target)
        if info["drift"]:
            _refuse(r, info)
        todo = [m for m in migrations if m.version <= version
                and m.version not in set(a["version"] for a in info["applied"])]
        result = {"changed": bool(todo), "baselined": [m.version for m in todo], "run_id": r.run_id,
                  "target": r.target, "version_before": info["current"],
                  "version_after": version if todo else info["current"], "warnings": []}
        if not todo:
            result["msg"] = "%s already records every version up to %s" % (r.target, version)
            return result
        # A file that would still apply cleanly here suggests its objects are missing: say so.
        applies = _applies_cleanly(r.conn, todo, s)
        if applies:
            result["warnings"].append(
                "%s would apply cleanly on this database (rehearsed, rolled back): are its objects really there?"
                " Baseline only versions the database is already at" % ", ".join(applies))
        if check:
            result["msg"] = "would record %s as applied (baseline, nothing run) on %s" % (
                ", ".join(m.version for m in todo), r.target)
            if result["warnings"]:
                result["msg"] += "; warning: " + result["warnings"][0]
            return result
        r.take_lease()

        def finish(cur, _ms_unused):
            for m in todo:
                cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms,"
                            " run_id, kind) VALUES (%s, %s, %s, %s, 0, %s, 'baseline')",
                            (m.version, m.name, m.checksum, actor(), r.run_id))
            log_event(cur, r.run_id, "baseline", "ok", version, 0,
                      {"versions": [m.version for m in todo],
                       "checksums": dict((m.version, m.checksum) for m in todo)})

        try:
            r.with_retries("baseline", version, None, lambda: run_in_tx(r.conn, r.lease, r.s, [], finish))
        except StepFailed as exc:
            raise LedgerError("baseline of %s failed: %s" % (r.target, exc.err.get("message")),
                              target=r.target, sqlstate=exc.err.get("sqlstate"))
        result["msg"] = "recorded %s as applied on %s (baseline: no file was run)" % (
            ", ".join(m.version for m in todo), r.target)
        if result["warnings"]:
            result["msg"] += "; warning: " + result["warnings"][0]
        return result
    finally:
        r.close()


def _applies_cleanly(conn, migrations, s):
    """Versions whose file runs without error here, each alone in a rolled-back savepoint (nothing written)."""
    clean = []
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            set_timeouts(cur, s)
            for m in migrations:
                cur.execute("SAVEPOINT ledger_baseline_probe")
                try:
                    for stmt in m.statements:
                        text, _note = rehearsal_form(stmt)
                        if text is not None:
                            cur.execute(text)
                    clean.append(m.version)
                except psycopg2.Error:
                    pass
                cur.execute("ROLLBACK TO SAVEPOINT ledger_baseline_probe")
    except psycopg2.Error:
        pass
    finally:
        safe_rollback(conn)
        if not conn.closed:
            conn.autocommit = True
    return clean


def accept_checksum(url, migrations, version, run_id=None, advice=None, check=False, lock_wait=None, lock_ttl=None):
    """Accept an intended edit (or rename) of an applied migration: record the file's checksum and name.

    The file is NOT run again. One transaction under the lease updates the history
    row and appends an ``accept_checksum`` event with both checksums. Refuses when
    the version is not applied, has no file in the set, or has no drift.
    """
    s = run_settings({"lock_wait": lock_wait, "lock_ttl": lock_ttl})
    version = str(version or "")
    if not VERSION_RE.match(version):
        raise LedgerError("accept_version must be a 4-digit version (got %r)" % version)
    r = Runner(url, migrations, run_id, s, advice, "accept_checksum")
    try:
        info = inspect(r.conn, migrations)
        row = dict((a["version"], a) for a in info["applied"]).get(version)
        if row is None:
            raise LedgerError("%s is not applied on %s: nothing to accept" % (version, r.target), target=r.target)
        m = dict((x.version, x) for x in migrations).get(version)
        if m is None:
            raise LedgerError("%s has no file in the set: restore the file (accepting a deletion is not possible;"
                              " revert it instead)" % version, target=r.target)
        result = {"changed": False, "run_id": r.run_id, "target": r.target, "version": version,
                  "old_checksum": row["checksum"], "new_checksum": m.checksum, "old_name": row["name"],
                  "new_name": m.name}
        if row["checksum"] == m.checksum and row["name"] == m.name:
            result["msg"] = "%s: the recorded checksum already matches %s" % (version, m.filename)
            return result
        result["changed"] = True
        if check:
            result["msg"] = "would record checksum %s for %s (was %s)" % (m.checksum, m.filename, row["checksum"])
            return result
        r.take_lease()

        def finish(cur, _ms_unused):
            cur.execute("UPDATE migrations.history SET checksum = %s, name = %s WHERE version = %s",
                        (m.checksum, m.name, version))
            log_event(cur, r.run_id, "accept_checksum", "ok", version, 0,
                      {"filename": m.filename, "old_checksum": row["checksum"], "new_checksum": m.checksum,
                       "old_name": row["name"], "new_name": m.name})

        r.with_retries("accept_checksum", version, m.filename, lambda: run_in_tx(r.conn, r.lease, r.s, [], finish))
        result["msg"] = "recorded checksum %s for %s (was %s); the file was not run again" % (
            m.checksum, m.filename, row["checksum"])
        return result
    finally:
        r.close()
