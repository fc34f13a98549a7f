# -*- coding: utf-8 -*-
"""revert(): the applied migrations above a version, newest first, with their down scripts.

The caller may pass ``before_down(version) -> SQL or None``: SQL run first in that
version's revert transaction (ledger_rollback's data-loss guard locks and re-counts
there), reported at the down script's first line.
"""

from __future__ import annotations

import time

try:
    import psycopg2
except ImportError:  # pragma: no cover - connect() reports it
    psycopg2 = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    log_event,
)


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import VERSION_RE
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import drift_of, elapsed_ms, read_history
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rehearsal import format_rehearsal, rehearse
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import Statement, split_sql
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_runner import (
    CommitUnknown,
    Runner,
    StepFailed,
    invalid_indexes,
    reset_session,
    run_in_tx,
    run_settings,
    run_statements,
    set_timeouts,
)

# =========================================================================== revert


def revert_plan(applied, migrations, to_version):
    """([(version, down tuple or None)], missing versions) of a revert down to ``to_version`` ('base' = all)."""
    if to_version in (None, ""):
        raise LedgerError("rollback_to is required: a version (e.g. 0009) or base")
    to_version = str(to_version)
    if to_version != "base" and not VERSION_RE.match(to_version):
        raise LedgerError("rollback_to must be a 4-digit version or base (got %r)" % to_version)
    floor = "" if to_version == "base" else to_version
    steps = []
    missing = []
    for row in sorted(applied, key=lambda x: x["version"], reverse=True):
        if row["version"] <= floor:
            continue
        down = migrations.down_for(row["version"]) if hasattr(migrations, "down_for") else None
        steps.append((row["version"], row, down))
        if down is None:
            missing.append(row["version"])
    return steps, missing


def revert(url, migrations, to_version, run_id=None, advice=None, check=False, lock_timeout=None,
           statement_timeout=None, lock_retries=None, retry_backoff=None, lock_wait=None, lock_ttl=None,
           connection_check=None, direct_url=None, before_down=None):
    """Revert the applied migrations above ``to_version`` ('base': all), newest first, with their down scripts.

    Refuses before any change when a needed ``.down.sql`` is missing (naming them,
    offering restore), when the up file of a migration to revert was edited or
    renamed since it was applied (its down script may not undo what was applied:
    accept_checksum or restore the file), and when a no-transaction down script would
    run through a pooler without ``direct_url`` (as apply()). The plan is computed
    again under the lease, with the same refusals. Each revert is one transaction holding the down script's
    statements, the DELETE of its history row and its ``revert`` event, under the
    lease, the timeouts and the retries of apply(). ``check=True`` rehearses the
    down scripts, newest first, in one rolled-back transaction and writes nothing.

    ``before_down(version)`` (a real run only) returns SQL to run first in that version's revert
    transaction, under the same timeouts and retries, or None; an error it raises is reported at the
    down script's first line (ledger_rollback locks and re-counts the tables a down script drops there).

    Returns {changed, reverted: [{version, filename, execution_ms}], version_before,
    version_after, rehearsal (check), run_id, target, msg}; raises LedgerError.
    """
    s = run_settings({"lock_timeout": lock_timeout, "statement_timeout": statement_timeout,
                      "lock_retries": lock_retries, "retry_backoff": retry_backoff, "lock_wait": lock_wait,
                      "lock_ttl": lock_ttl, "connection_check": connection_check})
    r = Runner(url, migrations, run_id, s, advice, "revert", direct_url=direct_url)
    t0 = time.monotonic()
    try:
        with r.conn.cursor() as cur:
            applied = read_history(cur) or []
        r.version_before = applied[-1]["version"] if applied else None
        steps = _revert_refusals(r, applied, migrations, to_version, check)
        base = {"changed": False, "reverted": [], "version_before": r.version_before,
                "version_after": r.version_before, "run_id": r.run_id, "target": r.target,
                "to_version": str(to_version), "plan": [v for v, _unused, _unused in steps]}
        if not steps:
            base["msg"] = "%s is at %s: nothing to revert down to %s" % (r.target, r.version_before or "no version",
                                                                         to_version)
            return base
        if check:
            pseudo = [_DownAsMigration(v, d) for v, _unused, d in steps]
            results = rehearse(url, pseudo, lock_timeout=s["lock_timeout"], statement_timeout=s["statement_timeout"],
                               lock_retries=s["lock_retries"], retry_backoff=s["retry_backoff"], conn=r.conn)
            base.update({"changed": True, "rehearsal": results,
                         "version_after": _floor_version(applied, to_version)})
            failed = [x for x in results if x["status"] == "would_fail"]
            base["msg"] = "would revert %s on %s: %s" % (", ".join(v for v, _unused, _unused in steps), r.target,
                                                         "; ".join(format_rehearsal(results)))
            if failed:
                f = failed[0]
                raise LedgerError("the revert rehearsal on %s: %s would fail at line %s: SQLSTATE %s: %s"
                                  % (r.target, f["filename"], f["line"], f["sqlstate"], f["message"]),
                                  target=r.target, rehearsal=results, file=f["filename"], line=f["line"],
                                  sqlstate=f["sqlstate"], message=f["message"], hint=f.get("hint"),
                                  next_command="fix %s and re-run the rehearsal" % f["filename"])
            return base
        r.take_lease()
        # The history may have changed while this run waited for the lease: plan (and refuse) again.
        with r.conn.cursor() as cur:
            applied = read_history(cur) or []
        r.version_before = applied[-1]["version"] if applied else None
        steps = _revert_refusals(r, applied, migrations, to_version, check, under_lease=True)
        for version, row, down in steps:
            r.done.append(_revert_one(r, version, row, _with_before(down, version, before_down)))
        base.update({"changed": bool(r.done), "reverted": r.done, "version_before": r.version_before,
                     "version_after": _floor_version(applied, to_version), "duration_ms": elapsed_ms(t0),
                     "plan": [v for v, _unused, _unused in steps]})
        if r.done:
            base["msg"] = "reverted %s on %s (now at %s)" % (", ".join(d["version"] for d in r.done), r.target,
                                                             base["version_after"] or "no version")
        else:
            base["msg"] = "%s is at %s: nothing to revert down to %s (another run reverted them meanwhile)" % (
                r.target, r.version_before or "no version", to_version)
        return base
    finally:
        r.close()


def _revert_refusals(r, applied, migrations, to_version, check, under_lease=False):
    """The revert plan's steps; LedgerError (with a ``refused`` event on a real run) before any change when
    a down script is missing, an up file to revert drifted, or a no-transaction down script would run
    through a pooler without direct_url."""
    steps, missing = revert_plan(applied, migrations, to_version)
    when = " (found under the lease: the history changed while this run waited)" if under_lease else ""
    if missing:
        nxt = ("add the missing down script(s), or restore a backup: `%s`"
               % r.advice.rollback("-e rollback_mode=restore"))
        msg = ("refusing to revert %s to %s before any change: no down script for %s (expected %s)%s\n  next: %s"
               % (r.target, to_version, ", ".join(missing),
                  ", ".join("%s_<name>.down.sql" % v for v in missing), when, nxt))
        if not check and applied:
            r.event("revert", "refused", None, None, {"missing_down": missing, "to_version": str(to_version)})
        raise LedgerError(msg, target=r.target, missing_down=missing, next_command=nxt, reverted=[])
    plan_versions = set(v for v, _unused, _unused in steps)
    drift = [d for d in drift_of(applied, migrations or [])
             if d["version"] in plan_versions and d["kind"] in ("edited", "renamed")]
    if drift:
        nxt = ("restore the applied file(s) as they were applied, or, for an intended edit (the down script"
               " matches the edited file), accept it first: `%s`; then re-run"
               " the rollback" % r.advice.accept_checksum(drift[0]["version"]))
        msg = ("refusing to revert %s to %s before any change: the up file of a migration to revert changed since"
               " it was applied, so its down script may not undo what was applied:\n  - %s%s\n  next: %s"
               % (r.target, to_version, "\n  - ".join(d["message"] for d in drift), when, nxt))
        if not check and applied:
            r.event("revert", "refused", None, None, {"drift": drift, "to_version": str(to_version)})
        raise LedgerError(msg, target=r.target, drift=drift, next_command=nxt, reverted=[])
    r.check_nontx_route([(v, d[1]) for v, _unused, d in steps if not d[2]], records=bool(applied) and not check)
    return steps


def _floor_version(applied, to_version):
    below = [a["version"] for a in applied if to_version != "base" and a["version"] <= str(to_version)]
    return below[-1] if below else None


class _DownAsMigration(object):
    """Adapter so rehearse() can run a down script."""

    def __init__(self, version, down):
        self.version = version
        self.path, self.filename, self.transactional, self.statements = down


def _with_before(down, version, before_down):
    """The down script with before_down(version)'s SQL as its first statement, at the script's first line."""
    sql = before_down(version) if before_down is not None else None
    if not sql:
        return down
    path, filename, transactional, statements = down
    statements = list(statements or [])
    first = split_sql(sql)[0]
    line = statements[0].line if statements else 1
    hook = Statement(first.text, line, first.offset, first.masked, [])
    return path, filename, transactional, [hook] + statements


def _revert_recorded(r, version):
    """Whether THIS run's revert of `version` committed: its history row gone and its revert event there."""
    try:
        with r.conn.cursor() as cur:
            cur.execute("SELECT NOT EXISTS (SELECT 1 FROM migrations.history WHERE version = %s)"
                        " AND EXISTS (SELECT 1 FROM migrations.events WHERE action = 'revert' AND outcome = 'ok'"
                        "             AND version = %s AND run_id = %s)", (version, version, r.run_id))
            return bool(cur.fetchone()[0])
    except psycopg2.Error:
        return False


def _revert_one(r, version, row, down):
    path, filename, transactional, statements = down
    t0 = r.t_step = time.monotonic()

    def finish(cur, ms):
        cur.execute("DELETE FROM migrations.history WHERE version = %s", (version,))
        if cur.rowcount != 1:
            raise LedgerError("%s is no longer in migrations.history (reverted by another run?)" % version,
                              target=r.target)
        log_event(cur, r.run_id, "revert", "ok", version, ms, {"filename": filename, "name": row["name"]})

    nxt = ("fix %s and re-run the rollback, or restore a backup: `%s`"
           % (filename, r.advice.rollback("-e rollback_mode=restore")))
    if transactional:
        try:
            ms, attempts = r.with_retries("revert", version, filename,
                                          lambda: run_in_tx(r.conn, r.lease, r.s, statements, finish))
        except StepFailed as exc:
            r.recover(exc)
            raise r.fail(version, filename, path, exc, "revert",
                         advice="this revert was rolled back: %s is still applied" % version, next_command=nxt)
        except CommitUnknown as exc:
            # As for an apply: the truth once the session that ran the COMMIT has ended.
            settled = r.settle_commit(exc)
            if settled and _revert_recorded(r, version):
                return {"version": version, "filename": filename, "execution_ms": None, "attempts": 1,
                        "duration_ms": elapsed_ms(t0),
                        "note": "connection lost during COMMIT; the revert is confirmed by the history"}
            if settled:
                advice = "the session that ran the COMMIT has ended and %s is still in the history: not reverted" % (
                    version)
            else:
                advice = ("the session (pid %s) that ran the COMMIT is still running: whether %s is reverted is not"
                          " known yet; check `%s` once it has ended" % (exc.backend_pid, version, r.advice.status()))
            raise r.fail(version, filename, path, StepFailed(exc.err, None), "revert (commit)", next_command=nxt,
                         advice=advice)
    else:
        nconn = r.nontx_conn()  # of its own (direct_url, else the URL; never a pooler): reset and closed after
        try:
            with nconn.cursor() as cur:
                set_timeouts(cur, r.s, local=False)
            t1 = time.monotonic()
            for stmt in statements:
                try:
                    r.with_retries("revert", version, filename,
                                   lambda stmt=stmt: run_statements(nconn.cursor(), [stmt]))
                except StepFailed as exc:
                    r.recover(exc)
                    raise r.fail(version, filename, path, exc, "non-transactional revert",
                                 extra={"invalid_indexes": invalid_indexes(r.conn) if not r.conn.closed else [],
                                        "transactional": False}, next_command=nxt)
        finally:
            reset_session(nconn)
            if not nconn.closed:
                nconn.close()
        ms = elapsed_ms(t1)
        attempts = 1
        try:
            r.with_retries("revert", version, filename,
                           lambda: run_in_tx(r.conn, r.lease, r.s, [], lambda cur, _x: finish(cur, ms)))
        except StepFailed as exc:
            raise r.fail(version, filename, path, exc, "revert (record)", next_command=nxt)
    return {"version": version, "filename": filename, "execution_ms": ms, "attempts": attempts,
            "duration_ms": elapsed_ms(t0)}
