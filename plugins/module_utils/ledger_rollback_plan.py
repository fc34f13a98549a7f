# -*- coding: utf-8 -*-
"""ledger_rollback's revert plan: what would be reverted, the rows at risk, the rehearsal of the down scripts,
and the verified backup a data-losing revert needs."""

from __future__ import annotations

import random
import re
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import RUN_OPTIONS_SPEC, extra_var, playbook_command
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import with_defaults
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, format_pg_error, pg_error,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    manifest_path_for, read_manifest, same_target, server_identity, target_slug, verify_against_manifest,
)

try:
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine
    ENGINE_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - reported when a revert needs it
    ledger_engine = None
    ENGINE_IMPORT_ERROR = _exc

try:
    import psycopg2
    from psycopg2 import sql
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
    sql = None


# ledger_rollback's arguments (the module's DOCUMENTATION describes them); _defaults() fills them in.
ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    mode=dict(type="str", choices=["revert", "restore", "cleanup"], default="revert"),
    step=dict(type="str", choices=["plan", "run"], default="run"),
    migrations_dir=dict(type="path"),
    rollback_to=dict(type="str"),
    versions=dict(type="list", elements="raw"),
    allow_data_loss=dict(type="bool", default=False),
    data_loss_backup=dict(type="path"),
    backup_dir=dict(type="path"),
    backup_file=dict(type="path"),
    backup_other_target=dict(type="bool", default=False),
    terminate_connections=dict(type="bool", default=False),
    drop_leftovers=dict(type="bool", default=False),
    drop_kept=dict(type="bool", default=False),
    allow_connections=dict(type="bool", default=False),
    maintenance_db=dict(type="str", default="postgres"),
    restore_jobs=dict(type="int", default=1),
    restore_space_margin=dict(type="float", default=1.2),
    swap_timeout=dict(type="int", default=15),
    pg_bindir=dict(type="path"),
    lock_timeout=dict(type="str", default="2s"),
    statement_timeout=dict(type="str", default="0"),
    lock_retries=dict(type="int", default=3),
    retry_backoff=dict(type="float"),
    lock_wait=dict(type="float"),
    lock_ttl=dict(type="float"),
    direct_url=dict(type="str", no_log=True),
    run_id=dict(type="str"),
    run_options=RUN_OPTIONS_SPEC,
    host_label=dict(type="str"),
    connect_timeout=dict(type="int", default=10),
)


VERSION_RE = re.compile(r"^[0-9]{4}$")
# Schemas a revert of the set never touches (the records live in `migrations`).
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "migrations")


def _defaults(params):
    return with_defaults(ARGUMENT_SPEC, params)


def _cmd(host, *extra):
    """The next command an operator runs, for this target (worded by ledger_next, with the run's options)."""
    return playbook_command("rollback", host or "<target>", " ".join(extra))


# =========================================================================== revert: the plan

def _engine():
    if ledger_engine is None:
        raise LedgerError("the migration engine (module_utils/ledger_engine.py) is not importable: %s; install the "
                          "project completely (make setup)" % ENGINE_IMPORT_ERROR)
    return ledger_engine


def _applied(cur):
    """migrations.history rows in version order ([] without records)."""
    return _engine().read_history(cur) or []


def _choose(applied, rollback_to, versions, host):
    """(versions to revert newest first, version the target ends at, requested versions not applied)."""
    applied_versions = [a["version"] for a in applied]
    if versions is not None:
        wanted = sorted(set(str(v.get("version") if isinstance(v, dict) else v) for v in versions))
        bad = [v for v in wanted if not VERSION_RE.match(v)]
        if bad:
            raise LedgerError("versions %s are not 4-digit migration versions" % ", ".join(bad))
        not_applied = [v for v in wanted if v not in applied_versions]
        wanted = [v for v in wanted if v in applied_versions]
        if wanted and applied_versions[-len(wanted):] != wanted:
            raise LedgerError(
                "refusing to revert %s: they are not the newest applied migrations (applied: %s); a down script is "
                "only safe on top of the schema it was written for. Nothing was changed. Revert by version instead: "
                "%s" % (", ".join(wanted), ", ".join(applied_versions), _cmd(host, "-e rollback_to=<version>")))
        below = [v for v in applied_versions if v < wanted[0]] if wanted else applied_versions
        return list(reversed(wanted)), (below[-1] if below else "base"), not_applied
    to = str(rollback_to or "").strip()
    if not to:
        raise LedgerError("rollback_to is required: a version (-e rollback_to=0009) or base (-e rollback_to=base) "
                          "to revert every migration of the set")
    if to.lower() == "base":
        return list(reversed(applied_versions)), "base", []
    if not VERSION_RE.match(to):
        raise LedgerError("rollback_to=%r is neither a 4-digit version (e.g. 0009) nor base" % to)
    return [v for v in reversed(applied_versions) if v > to], to, []


_SNAPSHOT_SQL = """
SELECT c.oid::bigint, n.nspname, c.relname, c.relkind::text,
       coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}')
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname <> ALL (%s)
   AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
 GROUP BY 1, 2, 3, 4
"""


def _snapshot(cur):
    """{oid: {table, schema, name, kind, columns}} of every user table (the records schema excluded)."""
    cur.execute(_SNAPSHOT_SQL, (list(SYSTEM_SCHEMAS),))
    return dict((oid, {"table": "%s.%s" % (nsp, rel), "schema": nsp, "name": rel, "kind": kind,
                       "columns": list(cols)})
                for oid, nsp, rel, kind, cols in cur.fetchall())


class _RehearsalFailed(Exception):
    def __init__(self, err, entry, stmt):
        super(_RehearsalFailed, self).__init__(err.get("message"))
        self.err, self.entry, self.stmt = err, entry, stmt


def _rehearse_once(conn, plan_items, p):
    """One rehearsal transaction: the down scripts newest first, a snapshot after each, then ROLLBACK."""
    engine = _engine()
    steps = []
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                        (p["lock_timeout"], p["statement_timeout"]))
            before = _snapshot(cur)
            current = before
            for entry in plan_items:
                step = {"version": entry["version"], "file": entry["down_file"], "ok": True, "skipped": []}
                stmt = None
                try:
                    for stmt in entry["statements"]:
                        # CONCURRENTLY runs in its plain form; VACUUM and the like can't run in a transaction.
                        text, note = engine.rehearsal_form(stmt)
                        if text is None:
                            step["skipped"].append("line %d: %s" % (stmt.line, note))
                            continue
                        cur.execute(text)
                except psycopg2.Error as exc:
                    raise _RehearsalFailed(pg_error(exc), entry, stmt)
                after = _snapshot(cur)
                step["dropped_tables"] = sorted(current[o]["table"] for o in current if o not in after)
                step["_gone"] = [o for o in current if o not in after]
                step["_cols"] = [(o, col) for o in current if o in after
                                 for col in current[o]["columns"] if col not in after[o]["columns"]]
                step["dropped_columns"] = sorted("%s.%s" % (current[o]["table"], col) for o, col in step["_cols"])
                steps.append(step)
                current = after
    finally:
        conn.rollback()
    return steps, before


def _rehearse_downs(url, plan_items, p):
    """Rehearse the down scripts (retrying a lock timeout with back-off); raise LedgerError on a failing one."""
    conn = connect(url, autocommit=False, connect_timeout=p["connect_timeout"])
    try:
        attempt = 0
        while True:
            try:
                return _rehearse_once(conn, plan_items, p)
            except _RehearsalFailed as exc:
                err, entry, stmt = exc.err, exc.entry, exc.stmt
                if err.get("sqlstate") in ("55P03", "40P01") and attempt < int(p["lock_retries"]):
                    time.sleep(min(0.5 * (2 ** attempt) * (0.5 + random.random()), 30.0))
                    attempt += 1
                    continue
                line = stmt.line_at(err.get("position")) if stmt is not None else None
                hint = ""
                if err.get("sqlstate") == "55P03":
                    hint = (" Another session holds a lock on a table this script drops (lock_timeout %s, %d "
                            "attempts): see the precheck's lock checks, then re-run." % (p["lock_timeout"],
                                                                                         attempt + 1))
                raise LedgerError(
                    "the down script %s%s fails in rehearsal on %s: %s.%s Nothing was changed. Fix the down script, "
                    "or restore the backup instead: %s"
                    % (entry["down_path"], " line %s" % line if line else "", describe_target(url),
                       format_pg_error(err), hint, _cmd(p.get("host_label"), "-e rollback_mode=restore")),
                    sqlstate=err["sqlstate"], file=entry["down_file"], path=entry["down_path"], line=line,
                    version=entry["version"], statement=stmt.summary() if stmt is not None else None)
    finally:
        conn.close()


def _count_rows(url, steps, before, p):
    """Rows in every table (or column) the down scripts would drop, read-only. [{version, table, column, rows}]"""
    at_risk = []
    conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            for step in steps:
                for oid, col in [(o, None) for o in step["_gone"]] + list(step["_cols"]):
                    t = before[oid]
                    ident = sql.Identifier(t["schema"], t["name"])
                    if col is None:
                        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(ident))
                    else:
                        cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(
                            ident, sql.Identifier(col)))
                    rows = cur.fetchone()[0]
                    # Row-level security hides rows from a role that neither owns the table nor bypasses RLS
                    # (and, when forced, from the owner too): then the count proves nothing, and the
                    # statistics are the better witness.
                    cur.execute("SELECT row_security_active(%s::oid::regclass),"
                                " (SELECT coalesce(n_live_tup, 0) FROM pg_stat_user_tables WHERE relid = %s::oid)",
                                (oid, oid))
                    rls, live = cur.fetchone()
                    entry = {"version": step["version"], "table": t["table"], "column": col, "rows": rows}
                    if rls:
                        entry["hidden_by_rls"] = True
                        entry["rows"] = max(rows, int(live or 0))
                        entry["rows_unknown"] = entry["rows"] == 0
                    if entry["rows"] or entry.get("rows_unknown"):
                        at_risk.append(entry)
    finally:
        conn.close()
    return at_risk


def _describe_risk(at_risk):
    parts = []
    for r in at_risk:
        what = r["table"] if not r.get("column") else "column %s.%s" % (r["table"], r["column"])
        if r.get("rows_unknown"):
            rows = "rows hidden from this role by row-level security"
        else:
            rows = "%d row%s" % (r["rows"], "" if r["rows"] == 1 else "s")
        parts.append("%s: %s (dropped by %s)" % (what, rows, r["version"]))
    return ", ".join(parts)


def plan_revert(params, check_mode=False, _migrations=None):
    """Read-only: what a revert would do, and whether it may (see DOCUMENTATION)."""
    return _plan(params, check_mode, _migrations)[0]


def _plan(params, check_mode=False, _migrations=None):
    """(the plan's result, the rehearsal's steps with what each version drops, the tables before)."""
    p = _defaults(params)
    url = p["database_url"]
    target = describe_target(url)
    host = p.get("host_label")
    if not p.get("migrations_dir"):
        raise LedgerError("migrations_dir is required to revert (the down scripts are read from it)")
    migrations = _migrations if _migrations is not None else _engine().load_migration_set(p["migrations_dir"])
    conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            applied = _applied(cur)
    finally:
        conn.close()
    to_revert, end, not_applied = _choose(applied, p.get("rollback_to"), p.get("versions"), host)
    applied_versions = [a["version"] for a in applied]
    names = dict((a["version"], a["name"]) for a in applied)
    if p.get("versions") is None and end != "base" and end not in applied_versions \
            and end not in [m.version for m in migrations]:
        raise LedgerError("rollback_to=%s is neither applied on %s nor a version of the set in %s (applied: %s). "
                          "Nothing was changed; check the version" % (
                              end, target, p["migrations_dir"], ", ".join(applied_versions) or "none"),
                          applied=applied_versions)
    plan_items = []
    missing = []
    for version in to_revert:
        down = migrations.down_for(version)
        if down is None:
            missing.append(version)
            down = (None, None, True, [])
        plan_items.append({"version": version, "name": names.get(version), "down_path": down[0],
                           "down_file": down[1], "transactional": down[2], "statements": down[3] or []})
    base = {"changed": False, "target": target, "applied": applied_versions, "to_version": end,
            "to_revert": [{"version": i["version"], "name": i["name"], "down_file": i["down_path"]}
                          for i in plan_items],
            "not_applied": not_applied, "missing_down": missing, "data_at_risk": [], "backup_needed": False,
            "rehearsal": [], "check_mode": check_mode}
    if missing:
        # backup_file: the backup to restore instead (on_failure=rollback: the one this run took).
        nxt = _cmd(host, "-e rollback_mode=restore", extra_var("backup_file", p["backup_file"]) if p.get("backup_file")
                   else "")
        raise LedgerError(
            "cannot revert %s to %s: no down script for %s in %s (expected %s; a revert runs every down script or "
            "none). Nothing was changed. Restore %s instead: %s"
            % (target, end, ", ".join(missing), p["migrations_dir"],
               ", ".join("%s_<name>.down.sql" % v for v in missing),
               "that backup" if p.get("backup_file") else "the newest verified backup", nxt
               + ("" if p.get("backup_file") else " (or add -e backup_file=PATH)")),
            **dict(base, next_command=nxt, refused="missing_down"))
    if not plan_items:
        if p.get("versions") is not None:
            base["msg"] = "nothing to revert on %s: the run applied none of its migrations (it is at %s)" % (
                target, applied_versions[-1] if applied_versions else "base")
        else:
            base["msg"] = "nothing to revert on %s: applied %s, target %s" % (
                target, ", ".join(applied_versions) or "none", end)
        return base, [], {}
    steps, before = _rehearse_downs(url, plan_items, p)
    at_risk = _count_rows(url, steps, before, p)
    base["rehearsal"] = [dict((k, v) for k, v in st.items() if not k.startswith("_")) for st in steps]
    base["data_at_risk"] = at_risk
    versions_txt = ", ".join(i["version"] for i in plan_items)
    if at_risk and not p.get("allow_data_loss"):
        nxt = _cmd(host, "-e rollback_to=%s" % end, "-e rollback_allow_data_loss=true")
        raise LedgerError(
            "refusing to revert %s on %s: the down scripts would drop data: %s. Nothing was changed. To keep the data, "
            "restore a backup instead (-e rollback_mode=restore) or move the rows first; to revert anyway, losing them "
            "(a verified backup is taken first): %s" % (versions_txt, target, _describe_risk(at_risk), nxt),
            **dict(base, refused="data_loss", next_command=nxt))
    base["backup_needed"] = bool(at_risk)
    base["msg"] = "%s revert %s on %s, newest first, ending at %s (down scripts rehearsed)%s" % (
        "would" if check_mode else "will", versions_txt, target, end,
        "; data loss allowed, a verified backup is taken first: %s" % _describe_risk(at_risk) if at_risk else
        "; no table or column they drop holds rows")
    return base, steps, before


# =========================================================================== revert: the run

def _target_identity(url, p):
    """server_identity of the target (system_identifier + database), read on the target itself."""
    conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            return server_identity(cur)
    finally:
        conn.close()


def _check_data_loss_backup(path, url, applied, host, run_id, identity=None):
    """The backup taken before a revert that loses rows: verified, of this target, by this run, at its version,
    with the row counts the revert's guard compares against."""
    if not path:
        raise LedgerError("the revert would drop rows and no verified backup of them was given (data_loss_backup); "
                          "nothing was reverted. The rollback role takes one first: %s"
                          % _cmd(host, "-e rollback_to=<version>", "-e rollback_allow_data_loss=true"))
    try:
        manifest = read_manifest(manifest_path_for(path))
        verify_against_manifest(path, manifest)
    except LedgerError as exc:
        raise LedgerError("the backup taken before the revert is not usable: %s. Nothing was reverted" % exc.msg)
    if manifest.get("verified") is not True:
        raise LedgerError("the backup %s failed its verification (its manifest says so): nothing was reverted" % path)
    if not same_target(manifest, target_slug(url), identity):
        raise LedgerError("the backup %s is of %s, not of this target (%s): nothing was reverted"
                          % (path, manifest.get("target"), describe_target(url)))
    if run_id and manifest.get("run_id") != run_id:
        raise LedgerError("the backup %s was taken by run %s, not by this run (%s): only a backup taken right before "
                          "the revert holds every row it drops. Nothing was reverted; re-run to take a new one"
                          % (path, manifest.get("run_id"), run_id))
    if list(manifest.get("applied") or []) != list(applied):
        raise LedgerError("the backup %s was taken at %s, the target is now at %s: it does not hold the rows the "
                          "revert would drop. Nothing was reverted; re-run to take a new one"
                          % (path, ", ".join(manifest.get("applied") or []) or "base", ", ".join(applied) or "base"))
    if not isinstance(manifest.get("row_counts"), dict):
        raise LedgerError("the backup %s has no row counts in its manifest (taken with backup_row_counts=false): the "
                          "revert can't prove that every row it drops is in it. Nothing was reverted; re-run (the "
                          "rollback role takes the backup with row counts): %s"
                          % (path, _cmd(host, "-e rollback_to=<version>", "-e rollback_allow_data_loss=true")))
    return manifest


# --------------------------------------------------------------------------- the guard inside each revert

# SQLSTATE of the guard's refusal (class "LR": ledger rollback; never raised by PostgreSQL itself).
