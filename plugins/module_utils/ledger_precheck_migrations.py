# -*- coding: utf-8 -*-
"""ledger_precheck's checks of the migration set: the set and drift, tables touched, the rehearsal."""

from __future__ import annotations

import re

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None

try:
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine
    ENGINE_IMPORT_ERROR = None
except ImportError as _exc:  # the engine ships with the migrate stage
    ledger_engine = None
    ENGINE_IMPORT_ERROR = _exc


from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact_policy
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_precheck_server import (
    check,
    not_run,
)


# --------------------------------------------------------------------------- migrations (the engine)

IDENT = r'(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)'
TABLE_REF = re.compile(r"\b(?:TABLE|ON|REFERENCES|INTO|UPDATE|VIEW|INDEX\s+ON)\s+(?:ONLY\s+)?"
                       r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(" + IDENT + r")(?:\s*\.\s*(" + IDENT + r"))?", re.I)
SQL_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.S)
NOT_TABLES = {"delete", "update", "insert", "truncate", "select", "conflict", "commit", "each", "row", "statement",
              "function", "schema", "table", "column", "constraint", "database", "role", "all", "only", "public",
              "on", "view", "set", "of", "to", "from", "if", "not", "exists", "as", "with", "for", "returning",
              "nothing", "default", "values", "index", "trigger", "sequence", "type", "policy"}


def tables_in_sql(text):
    """Relations a migration names, roughly (schema.table; unqualified names count as public)."""
    out = set()
    for first, second in TABLE_REF.findall(SQL_COMMENTS.sub(" ", text)):
        schema, table = (first, second) if second else ("public", first)
        schema, table = schema.strip('"'), table.strip('"')
        if table.lower() in NOT_TABLES:
            continue
        out.add("%s.%s" % (schema if second else "public", table))
    return out


def check_migrations(conn, params):
    """migration_set and drift, from the engine (read-only). Returns (checks, state)."""
    state = {"applied": [], "pending": [], "pending_items": [], "tables": set(), "problem": False}
    directory = params.get("migrations_dir")
    if not directory:
        return [check("migration_set", True, "not configured", None,
                      message="no migrations_dir given: migration checks skipped")], state
    state["problem"] = True
    if ledger_engine is None:
        why = "the migration engine (module_utils/ledger_engine.py) is not importable: %s" % ENGINE_IMPORT_ERROR
        return [check("migration_set", False, {"directory": directory}, None, message=why,
                      next_step="install the project completely (make setup) and re-run"),
                not_run("drift", "engine missing")], state
    threshold = "files present, names NNNN_name.sql, versions unique, none out of order, target in the set"
    try:
        migrations = ledger_engine.load_migration_set(directory)
    except LedgerError as exc:
        return [check("migration_set", False, {"directory": directory}, threshold,
                      message=exc.msg, next_step="fix the migration set in %s" % directory),
                not_run("drift", "the migration set is invalid")], state
    if not len(migrations):
        return [check("migration_set", False, {"directory": directory, "files": 0}, threshold,
                      message="no migration files (NNNN_name.sql) in %s" % directory,
                      next_step="set migrations_dir to the directory of the NNNN_name.sql files"),
                not_run("drift", "no migrations")], state
    try:
        info = ledger_engine.inspect(conn, migrations, target=params.get("target") or None,
                                     allow_out_of_order=bool(params.get("allow_out_of_order")))
    except LedgerError as exc:
        return [check("migration_set", False, {"directory": directory, "files": len(migrations)}, threshold,
                      message=exc.msg, next_step="fix the migration set or the target, then re-run"),
                not_run("drift", "the set could not be inspected")], state
    applied = [row["version"] for row in info["applied"]]
    pending_items = list(info["pending"])
    pending = [m.version for m in pending_items]
    state.update(applied=applied, pending=pending, pending_items=pending_items)
    for m in pending_items:
        state["tables"] |= tables_in_sql(m.text or "")
    problems = [o["message"] for o in info["out_of_order"]]
    if info["target_problem"]:
        problems.append(info["target_problem"])
    observed = {"directory": directory, "files": len(migrations), "first": migrations[0].version,
                "last": migrations[-1].version, "applied": len(applied), "current": info["current"],
                "target": info["target"], "pending": pending}
    out = [check("migration_set", not problems, observed, threshold,
                 [{"problem": x} for x in problems],
                 "; ".join(problems) if problems else "%d file(s), %d applied, %d pending%s" % (
                     len(migrations), len(applied), len(pending), ": " + ", ".join(pending) if pending else ""),
                 None if not problems else "fix the set or the target (out-of-order files are allowed with "
                                           "-e migrate_allow_out_of_order=true), then re-run")]
    drift = info["drift"]
    drift_rows = [dict((k, d.get(k)) for k in ("version", "kind", "filename", "recorded_name",
                                               "recorded_checksum", "file_checksum", "message")) for d in drift]
    out.append(check("drift", not drift, {"drifted": len(drift)}, {"drifted": 0}, drift_rows,
                     "%d applied migration(s), checksums unchanged" % len(applied) if not drift else
                     "%d applied migration(s) differ from the set: %s" % (
                         len(drift), "; ".join(d["message"] for d in drift)),
                     None if not drift else "restore the applied files as they were applied, or accept an intended "
                                            "edit explicitly (see roles/migrate/README.md)"))
    state["problem"] = bool(problems or drift)
    return out, state


# SQLSTATEs that say the rehearsal met the server's load, not a defect of the SQL: the
# statement ran past the rehearsal's statement_timeout (or was cancelled), a lock was not
# obtained within its lock_timeout, or it deadlocked with application traffic.
NOT_REHEARSED_SQLSTATES = {"57014": "statement timeout or cancel", "55P03": "lock timeout",
                           "40P01": "deadlock with another session"}


def stamp_plan(conn, params, state):
    """Production's precheck with staging's profile (promotion stamp): (results, heavy, differences) or None."""
    profile = params.get("impact_profile")
    if not profile or not state["pending_items"]:
        return None
    names = [rel.get("table") for f in profile if isinstance(f, dict) for st in f.get("statements") or []
             for rel in st.get("relations") or []]
    with conn.cursor() as cur:
        rows_here = ledger_impact_policy.rows_of_tables(cur, names)
    return ledger_impact_policy.from_stamp(profile, state["pending_items"], rows_here, params["lock_rows_threshold"])


def check_lock_impact(params, results, planned, migrations):
    """The lock policy over the rehearsal's observed profile, or staging's (the stamp) where it has one."""
    threshold = {"policy": params["lock_policy"], "rows_threshold": params["lock_rows_threshold"],
                 "impact": "a lock above SHARE UPDATE EXCLUSIVE held while working on, or a rewrite of, a "
                           "pre-existing table with more estimated rows than rows_threshold"}
    if not params.get("migrations_dir"):
        return None, None
    staged = planned[0] if planned else []
    staged_files = set(r["filename"] for r in staged)
    observed = [r for r in results or [] if r.get("impact") is not None and r["filename"] not in staged_files]
    profile = staged + observed
    if not profile:
        return None, None
    rows_threshold = params["lock_rows_threshold"]
    found = ledger_impact_policy.impacts(profile, rows_threshold)
    passed, message, nxt = ledger_impact_policy.policy_verdict(found, params["lock_policy"], rows_threshold)
    differences = planned[2] if planned else []
    if differences:
        sizes = ", ".join("%s %s rows here, %s on staging" % (d["table"], d["rows"], d["staging_rows"])
                          for d in differences)
        message += ("; table sizes differ from staging's by more than 10x: %s (staging's profile was measured on "
                    "other sizes)" % sizes)
    squawk = ledger_impact_policy.compare_squawk(observed, migrations, rows_threshold) if params.get("compare_squawk") else []
    observed_info = {"impacts": found, "table": ledger_impact_policy.format_table(profile),
                     "source": "staging's profile (promotion stamp)" if staged else "this rehearsal",
                     "size_differences": differences, "squawk": squawk}
    heavy = planned[1] if planned else {}
    result = {"files": ledger_impact_policy.stamp_profile(profile), "impacts": found, "squawk": squawk,
              "size_differences": differences, "policy": params["lock_policy"], "rows_threshold": rows_threshold,
              # The statements no rehearsal may run on this target (the migrate stage's --check obeys it too).
              "not_rehearsed": [{"file": f, "line": line, "reason": why} for (f, line), why in sorted(heavy.items())]}
    return check("lock_impact", passed, observed_info, threshold, [i for i in found if not i["allowed"]], message,
                 nxt if not passed else None), result


def _raced(conn, state, run_id):
    """Another run at work on the target during the rehearsal, in words, or None: pending versions applied since
    the inspection, or the run lease held by another live run (its migration's transaction not yet committed)."""
    try:
        with conn.cursor() as cur:
            applied = [r["version"] for r in ledger_engine.read_history(cur) or [] if r["version"] in state["pending"]]
            cur.execute("SELECT to_regclass('migrations.lock') IS NOT NULL")
            holder = None
            if cur.fetchone()[0]:
                cur.execute("SELECT run_id FROM migrations.lock WHERE id = 1 AND expires_at > clock_timestamp()"
                            " AND run_id IS DISTINCT FROM %s", (run_id,))
                row = cur.fetchone()
                holder = row[0] if row else None
    except psycopg2.Error:
        return None
    if applied:
        return "another run applied %s" % ", ".join(applied)
    if holder:
        return "another run (run id %s) holds the run lease and is applying migrations" % holder
    return None


def check_rehearsal(conn, url, params, state, session_failed, stop_before=None):
    """Run the pending migrations in one rolled-back transaction (the engine's rehearsal).

    The rehearsal runs on production, so it is bounded: CONCURRENTLY statements are not
    rehearsed (without CONCURRENTLY an index build takes a SHARE lock, blocking writes for
    the whole build), every statement has the rehearsal's statement_timeout, locks its
    lock_timeout, and a lock timeout is not retried. A timeout, a cancel or a deadlock is
    reported as "could not be fully rehearsed", never as a defect of the file.
    """
    threshold = "every pending file applies (in a transaction that is rolled back)"
    pending_items = state["pending_items"]
    if not params.get("migrations_dir"):
        return None, None
    if not params.get("rehearse"):
        return check("rehearsal", True, "disabled (precheck_rehearse=false)", threshold,
                     message="rehearsal disabled"), None
    if state["problem"]:
        return not_run("rehearsal", "the migration set has problems (see migration_set and drift)", threshold), None
    if not pending_items:
        return check("rehearsal", True, {"pending": 0}, threshold, message="nothing pending to rehearse"), None
    if session_failed:
        return not_run("rehearsal", "%s failed: the rehearsal would wait for their locks" % ", ".join(
            session_failed), threshold), None
    limits = {"statement_timeout": params["rehearse_statement_timeout"],
              "lock_timeout": params["rehearse_lock_timeout"], "lock_retries": 0, "concurrently": "not rehearsed"}
    threshold = {"every_file": "applies in a transaction that is rolled back", "limits": limits}
    try:
        results = ledger_engine.rehearse(url, pending_items, lock_timeout=limits["lock_timeout"],
                                         statement_timeout=limits["statement_timeout"], lock_retries=0,
                                         rehearse_concurrently=False, run_id=params.get("run_id"),
                                         record_event=False, conn=conn, stop_before=stop_before)
    except LedgerError as exc:
        return check("rehearsal", False, {"pending": state["pending"]}, threshold, message=exc.msg,
                     next_step=exc.fields.get("next_command") or "re-run when the target is reachable"), None
    failed = [r for r in results if r["status"] == "would_fail"]
    raced = _raced(conn, state, params.get("run_id")) if failed else None
    if raced:
        return check("rehearsal", True, {"pending": state["pending"], "inconclusive": True, "raced": raced},
                     threshold, message="not conclusive: %s while this precheck rehearsed the pending migrations, so "
                                        "its failure (%s at line %s: SQLSTATE %s) may be that run's work, not a defect; "
                                        "the migrate stage waits for that run's lease and applies only what is still "
                                        "pending, each in its own transaction" % (
                                            raced, failed[0]["filename"], failed[0].get("line"),
                                            failed[0].get("sqlstate"))), None
    lines = ledger_engine.format_rehearsal(results)
    offenders = [dict((k, r.get(k)) for k in ("version", "filename", "line", "sqlstate", "message", "hint",
                                              "statement")) for r in failed]
    skipped = [dict(x, filename=r["filename"]) for r in results for x in r.get("skipped_statements") or []]
    observed = {"rehearsed": len([r for r in results if r["status"] != "not_rehearsed"]),
                "would_apply": len([r for r in results if r["status"] == "would_apply"]),
                "would_fail": len(failed), "statements_not_rehearsed": len(skipped), "results": lines}
    not_rehearsed = ("; %d statement(s) not rehearsed (%s)" % (len(skipped), ", ".join(
        "%s line %s" % (x["filename"], x["line"]) for x in skipped[:5])) if skipped else "")
    if failed and failed[0].get("sqlstate") in NOT_REHEARSED_SQLSTATES:
        first = failed[0]
        observed["incomplete"] = True
        cause = NOT_REHEARSED_SQLSTATES[first["sqlstate"]]
        if first["sqlstate"] == "57014":
            limit = "statement_timeout %s" % limits["statement_timeout"]
        elif first["sqlstate"] == "55P03":
            limit = "lock_timeout %s" % limits["lock_timeout"]
        else:
            limit = "the server's deadlock detection"
        remaining = [r["filename"] for r in results if r["status"] == "not_rehearsed"]
        return check(
            "rehearsal", False, observed, threshold, offenders,
            "the pending migrations could not be fully rehearsed: %s at line %s hit the rehearsal's %s (%s, "
            "SQLSTATE %s: %s)%s; this says nothing against the SQL, the server was too busy to rehearse it "
            "without holding up its traffic" % (
                first["filename"], first.get("line"), limit, cause, first["sqlstate"], first.get("message"),
                "; not rehearsed after it: %s" % ", ".join(remaining) if remaining else ""),
            "nothing was changed; re-run at a quieter moment%s, or, after reviewing the pending SQL, "
            "skip the rehearsal with -e precheck_rehearse=false" % (
                " (or allow longer statements: -e precheck_rehearse_statement_timeout=2min)"
                if first["sqlstate"] == "57014" else "")), results
    if failed:
        first = failed[0]
        return check("rehearsal", False, observed, threshold, offenders,
                     "rehearsal: %s" % "; ".join(line for line in lines if "would fail" in line),
                     "fix %s at line %s (SQLSTATE %s), then re-run; nothing was changed" % (
                         first["filename"], first.get("line"), first.get("sqlstate"))), results
    stopped = [r for r in results if r.get("stopped_at")]
    if stopped:
        observed["not_rehearsed_here"] = [r["reason"] for r in stopped]
        return check("rehearsal", True, observed, threshold,
                     message="%d pending migration(s) rehearsed up to %s line %s, which staging's profile shows as "
                             "heavy: not rehearsed here (nor what follows it), so that the rehearsal never stalls "
                             "this target%s" % (len(results), stopped[0]["filename"], stopped[0]["stopped_at"],
                                                not_rehearsed)), results
    return check("rehearsal", True, observed, threshold,
                 message="%d pending migration(s) rehearsed, all would apply%s" % (len(results), not_rehearsed)), results
