#!/usr/bin/python
# -*- coding: utf-8 -*-
"""The two ways back of the runbook: revert with the down scripts, or restore a verified backup."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_rollback
short_description: Revert applied ledger migrations with their down scripts, or restore a verified backup
description:
  - One call does one stage's work, chosen by O(mode) and O(step).
  - "O(mode=revert) O(step=plan): read-only. Lists the applied migrations above O(rollback_to) (or exactly
    O(versions)), refuses when one of them has no C(.down.sql) (offering a restore), rehearses the down scripts
    newest first in one transaction that is rolled back, compares the tables and columns before and after
    (so a table dropped by C(CASCADE) counts too), counts the rows of every table or column that would go,
    and refuses when any holds rows unless O(allow_data_loss). Returns C(backup_needed) when rows would be lost
    and the loss is allowed."
  - "O(mode=revert) O(step=run): the same plan again (the rows may have changed), then, when rows would be lost,
    requires O(data_loss_backup): a verified backup of this target taken at its current version. Then the
    engine's revert: each down script newest first in its own transaction with the removal of its history row,
    under the run lease, lock_timeout and retries of the migrate stage. In that transaction, before the down
    script, a guard locks the tables it drops (or drops columns of) IN ACCESS EXCLUSIVE MODE and counts their rows
    again: rows the plan did not allow (any, without a data-loss backup; more than the backup counted, with one)
    roll that revert back and stop the run. In check mode the revert is rehearsed in a rolled-back transaction
    and nothing changes."
  - "O(mode=restore): restores the newest verified backup of this target (from the manifests in O(backup_dir))
    or O(backup_file), after checking its sha256 against its manifest and reading it in full. A backup is of this
    target when its manifest names the same server C(system_identifier) and database (whatever hostname or port
    reached it), or, for an older manifest without them, the same host-port-database; O(backup_file) of another
    target is refused unless O(backup_other_target). Before the copy is created, its room is checked (refused
    when the free space, measurable for a server on this machine, is below O(restore_space_margin) times the
    database's size). The dump is
    restored into a new database C(<db>_restore_<ts>), checked (every table of the archive present,
    migrations.history equal to the manifest's applied versions, row counts when the manifest has them), then
    swapped in with two C(ALTER DATABASE ... RENAME) in one transaction; the old database is kept as
    C(<db>_pre_restore_<ts>). A failure before the swap drops the new database and leaves the original as it
    was. The swap needs the original's connections closed: client sessions are terminated only with
    O(terminate_connections), otherwise the restore refuses before restoring anything, naming the sessions;
    autovacuum workers are terminated; any other server process (a walsender, a background worker) refuses the
    restore, naming it."
options:
  database_url: {description: libpq URI of the target database., type: str, required: true}
  mode: {description: revert (down scripts) or restore (a backup)., type: str, choices: [revert, restore], default: revert}
  step: {description: "plan: read-only checks (revert only); run: do it (or rehearse it in check mode).", type: str, choices: [plan, run], default: run}
  migrations_dir: {description: The migration set (NNNN_name.sql and NNNN_name.down.sql)., type: path}
  rollback_to: {description: "Revert the applied migrations above this version; C(base) reverts all.", type: str}
  versions: {description: "Revert exactly these versions (the migrations a failed run applied: version strings, or the
    engine's applied entries with a C(version) key); they must be the newest applied.", type: list, elements: raw}
  allow_data_loss: {description: Revert even when the dropped tables or columns hold rows (a verified backup is required first)., type: bool, default: false}
  data_loss_backup: {description: "The verified backup taken before a revert that loses rows (the backup role's backup_file).", type: path}
  backup_dir: {description: Where the backups and their manifests are (restore)., type: path}
  backup_file: {description: Restore this backup instead of the newest verified one (its manifest must be beside it)., type: path}
  backup_other_target: {description: "Restore O(backup_file) even when its manifest is of another target (another server's
    system_identifier or another database name).", type: bool, default: false}
  terminate_connections: {description: Terminate the sessions connected to the target so that the restored database can be swapped in., type: bool, default: false}
  maintenance_db: {description: Database to connect to for CREATE/ALTER DATABASE during a restore., type: str, default: postgres}
  restore_jobs: {description: Parallel pg_restore jobs into the new database., type: int, default: 1}
  restore_space_margin: {description: "Free space the copy needs, as a multiple of the database's size (refused below it
    when the free space is measurable: the server on this machine and data_directory readable).", type: float, default: 1.2}
  swap_timeout: {description: Seconds to wait for terminated sessions to go before the swap gives up., type: int, default: 15}
  pg_bindir: {description: Directory of pg_restore (default the server's major version's)., type: path}
  lock_timeout: {description: lock_timeout of each down script (and of the rehearsal)., type: str, default: 2s}
  statement_timeout: {description: statement_timeout of each down script (0 for none)., type: str, default: "0"}
  lock_retries: {description: Retries of a down script after a lock timeout (exponential back-off with jitter)., type: int, default: 3}
  retry_backoff: {description: First back-off in seconds before a retry (doubled each time, with jitter)., type: float}
  lock_wait: {description: Seconds to wait for another run's lease before failing., type: float}
  lock_ttl: {description: Seconds a lease lives without renewal (a killed run's lease expires after it)., type: float}
  direct_url:
    description: A URL of the same database that bypasses PgBouncer, used only for no-transaction down scripts.
    type: str
  run_id: {description: The run id recorded in the events., type: str}
  host_label: {description: How the operator names this target with -l (used in the next commands)., type: str}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
author: ledger-migrations
"""

EXAMPLES = r"""
- name: Plan the revert to 0009 (read-only)
  ledger_rollback:
    database_url: "{{ database_url }}"
    mode: revert
    step: plan
    migrations_dir: files/migrations
    rollback_to: "0009"

- name: Restore the newest verified backup of this target
  ledger_rollback:
    database_url: "{{ database_url }}"
    mode: restore
    backup_dir: /var/backups/ledger/staging
    terminate_connections: true
"""

RETURN = r"""
to_revert: {description: "Versions that are (or would be) reverted, newest first, each {version, name, down_file}.", type: list, returned: revert}
reverted: {description: Versions reverted by this call (empty in check mode)., type: list, returned: revert run}
missing_down: {description: Versions to revert that have no down script., type: list, returned: revert}
data_at_risk: {description: "Tables and columns the down scripts would drop that hold rows: {version, table, column, rows}.", type: list, returned: revert}
backup_needed: {description: Rows would be lost and the loss is allowed, so a verified backup must be taken first., type: bool, returned: revert}
rehearsal: {description: "The rehearsal of the down scripts: per version {version, ok, dropped_tables, dropped_columns}.", type: list, returned: revert}
backup_file: {description: The backup restored (or that would be)., type: str, returned: restore}
restored_database: {description: Name of the database after the swap (the target's name)., type: str, returned: restore}
previous_database: {description: Name under which the database as it was before the restore is kept., type: str, returned: restore}
drop_previous: {description: "psql command dropping the kept database (host, port, user, database names; no URL).", type: str, returned: restore}
space: {description: "Room for the copy: {needed_bytes, margin, free_bytes (null when not measurable), path, why, previous_copies}.", type: dict, returned: restore}
guarded: {description: Versions whose revert transaction locked and re-counted what they drop., type: list, returned: revert run}
blocking_sessions: {description: Sessions connected to the target (they block the swap)., type: list, returned: restore}
"""

import inspect
import os
import random
import re
import shlex
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.ledger_common import (
    LedgerError, connect, describe_target, ensure_records, format_pg_error, log_event, parse_url, pg_error,
    redact, redact_obj, url_with_database,
)
from ansible.module_utils.ledger_backup_utils import (
    find_bindir, find_newest_verified, full_read_check, human_bytes, libpq_env, list_manifests,
    manifest_path_for, read_manifest, same_target, server_identity, target_slug, verify_against_manifest,
)

try:
    from ansible.module_utils import ledger_engine
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

ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    mode=dict(type="str", choices=["revert", "restore"], default="revert"),
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
    host_label=dict(type="str"),
    connect_timeout=dict(type="int", default=10),
)

VERSION_RE = re.compile(r"^[0-9]{4}$")
# Schemas a revert of the set never touches (the records live in `migrations`).
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "migrations")


def _defaults(params):
    out = dict((k, v.get("default")) for k, v in ARGUMENT_SPEC.items())
    out.update(dict((k, v) for k, v in (params or {}).items() if v is not None))
    return out


def _cmd(host, *extra):
    """The next command an operator runs, for this target."""
    return " ".join(["ansible-playbook playbooks/rollback.yml -l %s" % (host or "<target>")] + list(extra))


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
        nxt = _cmd(host, "-e rollback_mode=restore")
        raise LedgerError(
            "cannot revert %s to %s: no down script for %s in %s (expected %s; a revert runs every down script or "
            "none). Nothing was changed. Restore the newest verified backup instead: %s (or add -e backup_file=PATH)"
            % (target, end, ", ".join(missing), p["migrations_dir"],
               ", ".join("%s_<name>.down.sql" % v for v in missing), nxt),
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
GUARD_SQLSTATE = "LR001"
_GUARD_TAG = "$ledger_rollback_guard$"


def _qi(name):
    return '"%s"' % name.replace('"', '""')


def _ql(text):
    return "'%s'" % str(text).replace("'", "''")


def _leaves(cur, oid):
    """schema.name of the leaf partitions of a partitioned table."""
    cur.execute("SELECT n.nspname || '.' || c.relname FROM pg_partition_tree(%s::oid::regclass) t"
                " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE t.isleaf", (oid,))
    return [r[0] for r in cur.fetchall()]


def _guard_checks(url, steps, before, backup_counts, p):
    """{version: {"lock": [tables], "checks": [{table, column, rows_sql, allowed, what}]}} of the plan.

    Without a data-loss backup, nothing may be dropped: every table the version drops must be empty and every
    column it drops NULL. With one (rollback_allow_data_loss), a table may hold at most the rows the backup
    counted (its manifest's row_counts, taken in the dump's snapshot): more means rows written after it.
    """
    guards = {}
    conn = None
    try:
        for step in steps:
            lock = set()
            checks = []
            for oid in step["_gone"]:
                t = before[oid]
                lock.add((t["schema"], t["name"]))
                # A partitioned table's rows are its leaves' (dropped with it, and counted one by one).
                if t["kind"] != "r":
                    continue
                ident = "%s.%s" % (_qi(t["schema"]), _qi(t["name"]))
                allowed = 0 if backup_counts is None else int(backup_counts.get(t["table"], 0))
                checks.append({"what": t["table"], "sql": "SELECT count(*) FROM %s" % ident, "allowed": allowed,
                               "unit": "row"})
            for oid, col in step["_cols"]:
                t = before[oid]
                lock.add((t["schema"], t["name"]))
                ident = "%s.%s" % (_qi(t["schema"]), _qi(t["name"]))
                what = "column %s.%s" % (t["table"], col)
                if backup_counts is None:
                    checks.append({"what": what, "sql": "SELECT count(*) FROM %s WHERE %s IS NOT NULL"
                                   % (ident, _qi(col)), "allowed": 0, "unit": "non-NULL value"})
                    continue
                if t["kind"] == "r":
                    allowed = int(backup_counts.get(t["table"], 0))
                else:
                    if conn is None:
                        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
                    with conn.cursor() as cur:
                        allowed = sum(int(backup_counts.get(leaf, 0)) for leaf in _leaves(cur, oid))
                checks.append({"what": what, "sql": "SELECT count(*) FROM %s" % ident, "allowed": allowed,
                               "unit": "row"})
            if lock:
                guards[step["version"]] = {"lock": sorted(lock), "checks": checks}
    finally:
        if conn is not None:
            conn.close()
    return guards


def _guard_sql(version, guard, backup):
    """One DO block: LOCK what the version drops (ACCESS EXCLUSIVE, under the engine's lock_timeout), re-count
    with row-level security off (a hidden row fails loudly instead of being missed), and RAISE GUARD_SQLSTATE when
    rows the plan did not allow are there. Run first in the version's revert transaction, it holds the locks until
    the down script has dropped the tables and the transaction commits: no row can slip in between."""
    since = "in the backup %s" % backup if backup else "allowed (the plan found none)"
    lines = [
        "DO %s" % _GUARD_TAG,
        "DECLARE",
        "  n bigint;",
        "  problems text[] := '{}';",
        "  rs text := current_setting('row_security');",
        "BEGIN",
        "  -- ledger_rollback: lock what the down script of %s drops, re-count, refuse rows the plan did not allow"
        % version,
        "  LOCK TABLE %s IN ACCESS EXCLUSIVE MODE;" % ", ".join("%s.%s" % (_qi(a), _qi(b)) for a, b in guard["lock"]),
        "  PERFORM set_config('row_security', 'off', true);",
        "  BEGIN",
    ]
    for c in guard["checks"]:
        lines += [
            "    %s INTO n;" % c["sql"],
            "    IF n > %d THEN" % c["allowed"],
            "      problems := problems || format('%%s: %%s %s%%s now, %%s %s', %s, n,"
            " CASE WHEN n = 1 THEN '' ELSE 's' END, %d);" % (c["unit"], since.replace("'", "''").replace("%", "%%"),
                                                              _ql(c["what"]), c["allowed"]),
            "    END IF;",
        ]
    lines += [
        "  EXCEPTION WHEN insufficient_privilege THEN",
        "    RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = 'cannot count the rows the down script of %s would drop:"
        " ' || SQLERRM, HINT = 'run the rollback as the tables'' owner, a superuser or a BYPASSRLS role';"
        % (GUARD_SQLSTATE, version),
        "  END;",
        "  PERFORM set_config('row_security', rs, true);",
        "  IF cardinality(problems) > 0 THEN",
        "    RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = array_to_string(problems, '; ');" % GUARD_SQLSTATE,
        "  END IF;",
        "END",
        _GUARD_TAG,
    ]
    return "\n".join(lines)


def _refusal_sql(version):
    """The 'down script' of a version the plan did not cover (applied after it): refuse, change nothing."""
    return ("DO %s BEGIN RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = '%s was applied after the plan and was "
            "not planned or counted'; END %s" % (_GUARD_TAG, GUARD_SQLSTATE, version, _GUARD_TAG))


def _statement(engine, text, line):
    """An engine Statement of `text`, reported at `line` of the down script it precedes."""
    st = engine.split_sql(text)[0]
    return type(st)(st.text, line, st.offset, st.masked, [])


class _GuardedSet(object):
    """The migration set as the engine's revert sees it: each planned down script preceded by its guard.

    engine.revert() has no hook inside its transactions (see the README); it reads each down script as
    (path, filename, transactional, statements) from down_for() and runs the statements, in one transaction
    with the removal of the history row. Prefixing the guard there puts the LOCK and the re-count in that very
    transaction, under the engine's lock_timeout and retries. A version the plan did not cover gets a down
    script that only refuses.
    """

    def __init__(self, inner, guard_sql, planned, engine):
        self._inner = inner
        self._guard_sql = guard_sql
        self._planned = set(planned)
        self._engine = engine

    def down_for(self, version):
        down = self._inner.down_for(version)
        if down is None:
            return None
        path, filename, transactional, statements = down
        statements = list(statements or [])
        first_line = statements[0].line if statements else 1
        if version not in self._planned:
            return (path, filename, transactional, [_statement(self._engine, _refusal_sql(version), first_line)])
        if version in self._guard_sql:
            statements = [_statement(self._engine, self._guard_sql[version], first_line)] + statements
        return (path, filename, transactional, statements)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


def _engine_has_before_down(engine):
    try:
        return "before_down" in inspect.signature(engine.revert).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def run_revert(params, check_mode=False):
    """The plan again (rows may have changed since the plan step), then the engine's revert, guarded."""
    p = _defaults(params)
    url = p["database_url"]
    target = describe_target(url)
    host = p.get("host_label")
    engine = _engine()
    migrations = engine.load_migration_set(p["migrations_dir"]) if p.get("migrations_dir") else None
    plan, steps, before = _plan(p, check_mode=check_mode, _migrations=migrations)
    plan["reverted"] = []
    if not plan["to_revert"]:
        return plan
    backup = None
    if plan["data_at_risk"] and not check_mode:
        backup = _check_data_loss_backup(p.get("data_loss_backup"), url, plan["applied"], host, p.get("run_id"),
                                         _target_identity(url, p))
    planned = [i["version"] for i in plan["to_revert"]]
    kwargs = {}
    revert_set = migrations
    if not check_mode:
        guards = _guard_checks(url, steps, before, backup.get("row_counts") if backup else None, p)
        guard_sql = dict((v, _guard_sql(v, g, p.get("data_loss_backup") if backup else None))
                         for v, g in guards.items())
        plan["guarded"] = sorted(guard_sql, reverse=True)
        if _engine_has_before_down(engine):
            def before_down(cur, migration, *_rest):
                version = getattr(migration, "version", migration)
                if version not in planned:
                    cur.execute(_refusal_sql(version))
                elif version in guard_sql:
                    cur.execute(guard_sql[version])
            kwargs["before_down"] = before_down
        else:
            revert_set = _GuardedSet(migrations, guard_sql, planned, engine)
    started = time.time()
    try:
        answer = engine.revert(url, revert_set, plan["to_version"], run_id=p.get("run_id"), limit=host,
                               check=check_mode, lock_timeout=p.get("lock_timeout"),
                               statement_timeout=p.get("statement_timeout"), lock_retries=p.get("lock_retries"),
                               retry_backoff=p.get("retry_backoff"), lock_wait=p.get("lock_wait"),
                               lock_ttl=p.get("lock_ttl"), direct_url=p.get("direct_url"), **kwargs)
    except LedgerError as exc:
        fields = dict(plan)
        fields["plan_msg"] = fields.pop("msg", None)
        fields.update(exc.fields)
        fields.pop("msg", None)
        if exc.fields.get("sqlstate") == GUARD_SQLSTATE:
            raise _guard_refusal(exc, fields, plan, target, host)
        fields.setdefault("next_command", _cmd(host, "-e rollback_mode=restore"))
        raise LedgerError(exc.msg, **fields)
    result = dict(plan)
    result.update(reverted=[d["version"] for d in answer.get("reverted") or []],
                  version_after=answer.get("version_after"), engine_rehearsal=answer.get("rehearsal"),
                  run_id=answer.get("run_id"), changed=bool(answer.get("changed")),
                  duration_s=round(time.time() - started, 3))
    if backup:
        result["data_loss_backup"] = p.get("data_loss_backup")
    versions_txt = ", ".join(i["version"] for i in plan["to_revert"])
    if check_mode:
        result["msg"] = ("would revert %s on %s, newest first, ending at %s (rehearsed in a rolled-back transaction; "
                         "nothing was changed)%s" % (
                             versions_txt, target, plan["to_version"],
                             "; rows that would be lost: %s" % _describe_risk(plan["data_at_risk"])
                             if plan["data_at_risk"] else ""))
    else:
        result["msg"] = "reverted %s on %s, now at %s%s" % (
            ", ".join(result["reverted"]) or "nothing", target, answer.get("version_after") or "base",
            "; rows dropped (kept in the verified backup %s): %s" % (
                p.get("data_loss_backup"), _describe_risk(plan["data_at_risk"])) if plan["data_at_risk"] else "")
    return result


def _guard_refusal(exc, fields, plan, target, host):
    """The operator's message when a revert's guard refused (rows the plan did not allow, or an unplanned version)."""
    version = exc.fields.get("version")
    reverted = list(exc.fields.get("reverted") or [])
    still = [i["version"] for i in plan["to_revert"] if i["version"] not in reverted]
    now_at = still[0] if still else plan["to_version"]
    message = exc.fields.get("message") or exc.msg
    unplanned = version not in [i["version"] for i in plan["to_revert"]]
    fields.update(refused="unplanned_version" if unplanned else "rows_since_plan", guard_message=message,
                  next_command=_cmd(host, "-e rollback_to=%s" % plan["to_version"]))
    done = "; reverted before it (committed): %s" % ", ".join(reverted) if reverted else ""
    if unplanned:
        return LedgerError(
            "stopped the revert on %s before %s: %s (another run applied it after the plan). Nothing of it was "
            "dropped%s. Re-run, so that the plan covers and counts it: %s" % (
                target, version, message, done, fields["next_command"]), **fields)
    return LedgerError(
        "stopped the revert of %s on %s before its down script ran: %s. These rows were written after the plan "
        "counted them; nothing of %s was dropped (its transaction was rolled back)%s, and %s is still applied. "
        "Stop the writers, then re-run: the plan counts again and refuses, or asks for rollback_allow_data_loss "
        "(with a new backup): %s" % (
            version, target, message, version, done, now_at, fields["next_command"]), **fields)


# =========================================================================== restore

def _sessions(cur, dbname):
    cur.execute(
        "SELECT pid, usename, application_name, coalesce(host(client_addr), 'local'), state, backend_type,"
        "       extract(epoch FROM now() - backend_start)::int, left(regexp_replace(query, '\\s+', ' ', 'g'), 80)"
        "  FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY backend_start", (dbname,))
    return [{"pid": r[0], "user": r[1], "application_name": r[2], "client": r[3], "state": r[4],
             "backend_type": r[5], "connected_s": r[6], "query": r[7]} for r in cur.fetchall()]


def _describe_sessions(rows, limit=8):
    out = ["pid %s (%s, %s, from %s, %s, %ss)" % (r["pid"], r["user"], r["application_name"] or r["backend_type"],
                                                  r["client"], r["state"] or r["backend_type"], r["connected_s"])
           for r in rows[:limit]]
    if len(rows) > limit:
        out.append("and %d more" % (len(rows) - limit))
    return "; ".join(out)


def _db_properties(cur, dbname):
    cur.execute(
        "SELECT d.oid, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,"
        "       d.datlocprovider, d.daticulocale, d.datconnlimit, t.spcname, d.datacl IS NOT NULL,"
        "       shobj_description(d.oid, 'pg_database'), pg_database_size(d.oid)"
        "  FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s", (dbname,))
    row = cur.fetchone()
    if row is None:
        return None
    props = dict(zip(("oid", "owner", "encoding", "collate", "ctype", "locprovider", "icu_locale", "connlimit",
                      "tablespace", "has_acl", "comment", "size"), row))
    props["acl"] = []
    if props["has_acl"]:
        cur.execute("SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,"
                    "       a.privilege_type, a.is_grantable"
                    "  FROM pg_database d, aclexplode(d.datacl) a WHERE d.oid = %s", (props["oid"],))
        props["acl"] = [{"grantee": g, "privilege": priv, "grantable": gr} for g, priv, gr in cur.fetchall()]
    cur.execute("SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, unnest(s.setconfig)"
                "  FROM pg_db_role_setting s WHERE s.setdatabase = %s", (props["oid"],))
    props["settings"] = [{"role": r, "setting": s} for r, s in cur.fetchall()]
    return props


# GUCs whose stored value is a list of already-quoted items (pg_dump treats them the same way).
_LIST_GUCS = ("search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries",
              "shared_preload_libraries")


def _create_like(cur, new_db, props):
    """CREATE DATABASE new_db with the properties, grants and settings of the database it will replace."""
    opts = [sql.SQL("TEMPLATE template0"), sql.SQL("OWNER {}").format(sql.Identifier(props["owner"])),
            sql.SQL("ENCODING {}").format(sql.Literal(props["encoding"])),
            sql.SQL("LC_COLLATE {}").format(sql.Literal(props["collate"])),
            sql.SQL("LC_CTYPE {}").format(sql.Literal(props["ctype"])),
            sql.SQL("TABLESPACE {}").format(sql.Identifier(props["tablespace"])),
            sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(props["connlimit"]))]
    if props.get("locprovider") == "i":
        opts += [sql.SQL("LOCALE_PROVIDER icu"), sql.SQL("ICU_LOCALE {}").format(sql.Literal(props["icu_locale"]))]
    cur.execute(sql.SQL("CREATE DATABASE {} ").format(sql.Identifier(new_db)) + sql.SQL(" ").join(opts))
    ident = sql.Identifier(new_db)
    if props["has_acl"]:
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(ident, sql.Identifier(props["owner"])))
        for a in props["acl"]:
            grantee = sql.SQL("PUBLIC") if a["grantee"] is None else sql.Identifier(a["grantee"])
            cur.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(a["privilege"]), ident, grantee,
                sql.SQL(" WITH GRANT OPTION" if a["grantable"] else "")))
    for s in props["settings"]:
        name, _, value = s["setting"].partition("=")
        val = sql.SQL(value) if name.lower() in _LIST_GUCS else sql.Literal(value)
        if s["role"] is None:
            cur.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(ident, sql.Identifier(name), val))
        else:
            cur.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} TO {}").format(
                sql.Identifier(s["role"]), ident, sql.Identifier(name), val))
    if props.get("comment"):
        cur.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(props["comment"])))


def _archive_tables(bindir, path):
    """Tables (schema.name) with data in the archive's table of contents."""
    res = subprocess.run([os.path.join(bindir, "pg_restore"), "--list", path], capture_output=True, text=True,
                         check=False)
    tables = set()
    for line in res.stdout.splitlines():
        if line.startswith(";"):
            continue
        m = re.match(r"^\s*\d+;\s*\d+\s+\d+\s+TABLE\s+(?!DATA\s)(\S+)\s+(\S+)\s", line)
        if m:
            tables.add("%s.%s" % (m.group(1), m.group(2)))
    return tables


def _locate_backup(p, url, host, identity=None):
    """(backup path, manifest) to restore, or raise before anything is touched.

    A backup is of this target when its manifest's (system_identifier, database) equal the target's (or, for a
    manifest without them, when its host-port-dbname slug equals the URL's).
    """
    slug = target_slug(url)
    target = describe_target(url)
    if p.get("backup_file"):
        path = os.path.abspath(os.path.expanduser(str(p["backup_file"]))).rstrip("/")
        mpath = manifest_path_for(path)
        if not os.path.exists(mpath):
            raise LedgerError("backup_file %s has no manifest beside it (%s): its checksum can't be checked, so it is "
                              "not restored. Nothing was changed" % (path, mpath))
        manifest = read_manifest(mpath)
        if manifest.get("verified") is not True:
            raise LedgerError("backup %s failed its verification when it was taken (its manifest %s says "
                              "verified=%s): it is not restored. Nothing was changed; choose another backup"
                              % (path, mpath, manifest.get("verified")))
        other = not same_target(manifest, slug, identity)
        if other and not p.get("backup_other_target"):
            how = ("server %s, database %s; this target is server %s, database %s" % (
                manifest.get("system_identifier"), manifest.get("database"),
                (identity or {}).get("system_identifier"), (identity or {}).get("database"))
                if manifest.get("system_identifier") and (identity or {}).get("system_identifier")
                else "its manifest names %s" % manifest.get("target_slug"))
            raise LedgerError("backup %s is of %s, not of %s (%s): it is not restored over another database. Nothing "
                              "was changed. If that is what you mean (e.g. a copy of production into a scratch "
                              "database), say so: %s" % (
                                  path, manifest.get("target"), target, how,
                                  _cmd(host, "-e rollback_mode=restore", "-e backup_file=%s" % path,
                                       "-e rollback_backup_other_target=true")),
                              backup_file=path, refused="other_target")
        manifest = dict(manifest, backup_path=path, manifest_path=mpath, other_target=other)
        return path, manifest
    backup_dir = p.get("backup_dir")
    if not backup_dir:
        raise LedgerError("no backup_dir to look for backups of %s in: set backup_dir, or give -e backup_file=PATH"
                          % target)
    manifest = find_newest_verified(backup_dir, slug, identity)
    if manifest is None:
        others = list_manifests(backup_dir, slug, identity)
        raise LedgerError("no verified backup of %s in %s (%d manifest(s) of this target, none verified with its file "
                          "present). Nothing was changed; give one with %s"
                          % (target, backup_dir, len(others), _cmd(host, "-e rollback_mode=restore",
                                                                    "-e backup_file=PATH")))
    return manifest["backup_path"], dict(manifest, other_target=False)


def _short_name(dbname, suffix):
    """`<db><suffix>` within PostgreSQL's 63-byte identifiers (the database name is shortened, not the suffix)."""
    room = 63 - len(suffix.encode())
    base = dbname.encode()[:room].decode("utf-8", "ignore")
    return base + suffix


def _db_exists(cur, name):
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    return cur.fetchone() is not None


def _drop_db(cur, name):
    try:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        return True
    except psycopg2.Error:
        return False


def _log_if_recorded(url, p, outcome, version, duration_ms, detail):
    """Log an event on its own connection when the records exist; a failed restore creates nothing."""
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    except LedgerError:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('migrations.events') IS NOT NULL")
            if not cur.fetchone()[0]:
                return False
            log_event(cur, p.get("run_id") or "adhoc", "restore", outcome, version=version,
                      duration_ms=duration_ms, detail=detail)
            return True
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def _restore_failed(url, p, started, msg, fields):
    """Record the failed restore on the (unchanged) target, then raise the operator's error."""
    fields = dict(fields, event_logged=_log_if_recorded(
        url, p, "failed", fields.get("schema_version"), int((time.time() - started) * 1000),
        dict(redact_obj(dict((k, v) for k, v in fields.items() if k != "blocking_sessions")), error=redact(msg))))
    raise LedgerError(msg, **fields)


# Backends a restore deals with: client sessions (terminated only with terminate_connections; a parallel worker
# goes with its leader) and autovacuum workers (terminated at the swap: they restart on their own). Any other
# process connected to the database (a walsender of logical replication, a background worker) refuses the restore.
CLIENT_BACKENDS = ("client backend", "parallel worker")
SELF_RESTARTING = ("autovacuum worker",)
# Hosts whose server's data directory can be this machine's (free space measurable with statvfs).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _restore_space(cur, url, props, margin):
    """Room for the copy: {needed_bytes, margin, free_bytes (None when not measurable), path, why}.

    Measured only when the server runs on this machine (the URL's host is a loopback name or a socket
    directory) and the role may read data_directory (superuser or pg_read_all_settings): then the free space of
    the filesystem holding the database's tablespace (statvfs). Otherwise the size needed is only reported.
    """
    needed = int(props["size"] * margin)
    out = {"needed_bytes": needed, "margin": margin, "free_bytes": None, "path": None, "why": None}
    host = parse_url(url)["host"] or ""
    if host not in LOCAL_HOSTS and not host.startswith("/"):
        out["why"] = "the server (%s) is not on this machine" % host
        return out
    cur.execute("SELECT CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE')"
                " THEN current_setting('data_directory') END,"
                " (SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = %s)",
                (props["tablespace"],))
    datadir, location = cur.fetchone()
    if not datadir:
        out["why"] = "the role may not read data_directory (superuser or pg_read_all_settings needed)"
        return out
    path = location or datadir
    out["path"] = path
    if not os.path.isdir(path):
        out["why"] = "%s is not a directory on this machine" % path
        return out
    try:
        st = os.statvfs(path)
    except OSError as exc:
        out["why"] = "cannot read the free space of %s: %s" % (path, exc)
        return out
    out["free_bytes"] = st.f_bavail * st.f_frsize
    return out


def _previous_copies(cur, dbname):
    """The <db>_pre_restore_* databases earlier restores kept: [{name, size_bytes}], oldest first."""
    like = dbname.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "\\_pre\\_restore\\_%"
    cur.execute("SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT') THEN pg_database_size(oid) END"
                "  FROM pg_database WHERE datname LIKE %s ORDER BY datname", (like,))
    return [{"name": r[0], "size_bytes": r[1]} for r in cur.fetchall()]


def _drop_how(admin_url):
    """Where a kept database is dropped from: the maintenance database, named without any URL or password."""
    parts = parse_url(admin_url)
    return {"host": parts["host"], "port": parts["port"], "user": parts["user"], "dbname": parts["dbname"],
            "target": describe_target(admin_url)}


def _drop_command(how, name):
    """psql command dropping a kept database (host, port, user and database names only: no URL, no password)."""
    return "psql -h %s -p %s -U %s -d %s -c %s" % (
        shlex.quote(str(how["host"])), how["port"], shlex.quote(str(how["user"])), shlex.quote(str(how["dbname"])),
        shlex.quote('DROP DATABASE "%s"' % name.replace('"', '""')))


def _copies_advice(copies, how):
    if not copies:
        return "Free space on the server (or restore on another one), then re-run"
    total = sum(c["size_bytes"] or 0 for c in copies)
    names = ", ".join("%s (%s)" % (c["name"], human_bytes(c["size_bytes"])) for c in copies[:5])
    if len(copies) > 5:
        names += " and %d more" % (len(copies) - 5)
    return ("%d database(s) kept by earlier restores hold %s: %s. Drop those no longer needed (after checking "
            "that nothing written to them is still wanted), e.g.: %s" % (
                len(copies), human_bytes(total), names, _drop_command(how, copies[0]["name"])))


def _describe_space(space, props):
    text = "the copy needs about %s free on the server (%s database x %s)" % (
        human_bytes(space["needed_bytes"]), human_bytes(props["size"]), space["margin"])
    if space["free_bytes"] is not None:
        text += ", %s has %s free" % (space["path"], human_bytes(space["free_bytes"]))
    else:
        text += "; free space not measured: %s" % space["why"]
    if space.get("previous_copies"):
        text += "; %d database(s) kept by earlier restores hold %s" % (
            len(space["previous_copies"]), human_bytes(sum(c["size_bytes"] or 0 for c in space["previous_copies"])))
    return text


def run_restore(params, check_mode=False):
    p = _defaults(params)
    started = time.time()
    url = p["database_url"]
    target = describe_target(url)
    host = p.get("host_label")
    dbname = parse_url(url)["dbname"]
    if dbname == p["maintenance_db"]:
        raise LedgerError("the target database %s is also the maintenance database the restore connects to for the "
                          "swap: set rollback_maintenance_db to another one (e.g. template1). Nothing was changed"
                          % dbname)
    admin_url = url_with_database(url, p["maintenance_db"])
    admin = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with admin.cursor() as cur:
            # Which server this is, whatever name or port reached it: the backups of this target are those
            # whose manifests name the same system_identifier and database.
            identity = server_identity(cur, dbname)
            path, manifest = _locate_backup(p, url, host, identity)
            # 1. The file is the one the manifest describes (sha256, size) and reads in full: before anything else.
            verify_against_manifest(path, manifest)
            cur.execute("SELECT current_setting('server_version_num')::int / 10000, rolsuper OR rolcreatedb"
                        "  FROM pg_roles WHERE rolname = current_user")
            major, can_create = cur.fetchone()
            bindir = find_bindir(major, p.get("pg_bindir"))
            read = full_read_check(path, bindir=bindir)
            if not read["ok"]:
                raise LedgerError("backup %s matches its manifest but can't be read in full (pg_restore -f /dev/null "
                                  "exited %s): %s. Nothing was changed; choose another backup (-e backup_file=PATH)"
                                  % (path, read["rc"], read["error"]), full_read=read, backup_file=path)
            props = _db_properties(cur, dbname)
            if props is None:
                raise LedgerError("database %s does not exist on %s: nothing to restore over (create it, or restore "
                                  "by hand with pg_restore --create)" % (dbname, describe_target(admin_url)))
            if not can_create:
                raise LedgerError("the role connecting to %s can't CREATE DATABASE: the restore goes into a new "
                                  "database swapped in by name; grant CREATEDB (or run it as the database owner with "
                                  "CREATEDB). Nothing was changed" % target)
            sessions = _sessions(cur, dbname)
            space = _restore_space(cur, url, props, float(p.get("restore_space_margin") or 1.2))
            space["previous_copies"] = _previous_copies(cur, dbname)
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
            new_db = _short_name(dbname, "_restore_%s" % stamp)
            old_db = _short_name(dbname, "_pre_restore_%s" % stamp)
            n = 2
            while _db_exists(cur, new_db) or _db_exists(cur, old_db):
                new_db = _short_name(dbname, "_restore_%s_%d" % (stamp, n))
                old_db = _short_name(dbname, "_pre_restore_%s_%d" % (stamp, n))
                n += 1
    finally:
        admin.close()
    clients = [s for s in sessions if s["backend_type"] in CLIENT_BACKENDS]
    others = [s for s in sessions if s["backend_type"] not in CLIENT_BACKENDS + SELF_RESTARTING]
    drop_how = _drop_how(admin_url)
    base = {"target": target, "backup_file": path, "manifest": manifest.get("manifest_path"),
            "sha256": manifest.get("sha256"), "backup_taken_at": manifest.get("started_at"),
            "schema_version": manifest.get("schema_version"), "backup_applied": manifest.get("applied"),
            "restored_database": dbname, "staging_database": new_db, "previous_database": old_db,
            "blocking_sessions": sessions, "database_size_bytes": props["size"], "check_mode": check_mode,
            "space": space, "other_target": bool(manifest.get("other_target")),
            "backup_system_identifier": manifest.get("system_identifier"), "backup_database": manifest.get("database"),
            "strategy": "restore into a new database, check it, swap the names"}
    if others:
        raise LedgerError(
            "refusing to restore %s: %d server process(es) that are not client sessions are connected to %s: %s. "
            "The restore terminates client sessions (with rollback_terminate_connections) and autovacuum workers "
            "only, never a replication sender or a background worker: stop them first (a logical replication "
            "subscriber: ALTER SUBSCRIPTION ... DISABLE on the subscriber; a background worker: its extension's "
            "own command), then re-run. Nothing was changed" % (target, len(others), dbname,
                                                                 _describe_sessions(others)),
            **dict(base, refused="server_processes", server_processes=others))
    if space["free_bytes"] is not None and space["free_bytes"] < space["needed_bytes"]:
        raise LedgerError(
            "refusing to restore %s: the copy needs about %s free (%s database x %s) where the server keeps it (%s), "
            "which has %s free. Nothing was changed. %s" % (
                target, human_bytes(space["needed_bytes"]), human_bytes(props["size"]), space["margin"],
                space["path"], human_bytes(space["free_bytes"]), _copies_advice(space["previous_copies"], drop_how)),
            **dict(base, refused="space"))
    if clients and not p.get("terminate_connections"):
        raise LedgerError(
            "refusing to restore %s: %d session(s) are connected to %s and the restored database can only be swapped "
            "in when they are gone: %s. Nothing was changed. Stop them (the application, PgBouncer: PAUSE), or let the "
            "restore terminate them: %s" % (target, len(clients), dbname, _describe_sessions(clients),
                                            _cmd(host, "-e rollback_mode=restore",
                                                 "-e rollback_terminate_connections=true")),
            **dict(base, refused="sessions"))
    if check_mode:
        return dict(base, changed=True, msg=(
            "would restore %s (sha256 %s verified against its manifest, read in full; taken %s at version %s) into a "
            "new database %s, check it, then swap it in for %s and keep the current one as %s; %s%s%s" % (
                path, (manifest.get("sha256") or "")[:12], manifest.get("started_at"),
                manifest.get("schema_version") or "base", new_db, dbname, old_db, _describe_space(space, props),
                "; would terminate %d session(s): %s" % (len(clients), _describe_sessions(clients)) if clients else
                "", "; the backup is of another target (%s), restored as asked" % manifest.get("target")
                if manifest.get("other_target") else "")))

    admin = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
    swapped = False
    try:
        with admin.cursor() as cur:
            # 2. The copy: a new database like the current one, restored with --exit-on-error.
            try:
                _create_like(cur, new_db, props)
            except psycopg2.Error as exc:
                err = pg_error(exc)
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, "cannot create the database %s to restore %s into: %s. %s is "
                                "unchanged" % (new_db, path, format_pg_error(err), dbname),
                                dict(base, sqlstate=err["sqlstate"]))
            cmd = [os.path.join(bindir, "pg_restore"), "--exit-on-error", "--no-password"]
            if int(p.get("restore_jobs") or 1) > 1:
                cmd += ["--jobs=%d" % int(p["restore_jobs"])]
            with libpq_env(url, p["connect_timeout"]) as (env, conninfo):
                res = subprocess.run(cmd + ["--dbname=%s" % url_with_database(conninfo, new_db), path],
                                     capture_output=True, text=True, env=env, check=False, cwd="/")
            if res.returncode != 0:
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, (
                    "restore of %s failed half-way (pg_restore exited %d): %s. The partial copy %s was dropped; %s is "
                    "unchanged. Choose another backup (-e backup_file=PATH) or revert with the down scripts: %s"
                    % (path, res.returncode, redact(res.stderr.strip())[-1500:] or "no message", new_db, target,
                       _cmd(host, "-e rollback_to=<version>"))), dict(base, pg_restore_rc=res.returncode))
            # 3. Check the copy before it replaces anything.
            problems, counts = _check_copy(url_with_database(url, new_db), manifest, bindir, path, p)
            if problems:
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, (
                    "the restored copy of %s does not match its manifest: %s. It was dropped; %s is unchanged"
                    % (path, "; ".join(problems), target)), dict(base, problems=problems))
            # 4. The swap.
            terminated = _swap(cur, dbname, new_db, old_db, p, base, url, started)
            swapped = True
    finally:
        admin.close()
    duration_ms = int((time.time() - started) * 1000)
    detail = {"backup_file": path, "sha256": manifest.get("sha256"), "backup_taken_at": manifest.get("started_at"),
              "backup_run_id": manifest.get("run_id"), "applied": manifest.get("applied"),
              "previous_database": old_db, "terminated": [s["pid"] for s in terminated], "tables": len(counts)}
    # 5. The record, in the restored database (its events log came back with the dump). The restore
    # is done whatever happens here: a failure to log is reported, not raised.
    logged, log_error = True, None
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
        try:
            with conn.cursor() as cur:
                ensure_records(cur)
                log_event(cur, p.get("run_id") or "adhoc", "restore", "ok", version=manifest.get("schema_version"),
                          duration_ms=duration_ms, detail=detail)
        finally:
            conn.close()
    except (LedgerError, psycopg2.Error) as exc:
        logged, log_error = False, redact(getattr(exc, "msg", None) or str(exc)).strip()
    drop_cmd = _drop_command(drop_how, old_db)
    warnings = [] if logged else ["the restore could not be logged in migrations.events: %s" % log_error]
    if space["previous_copies"]:
        warnings.append("%d earlier copies kept by restores are still on the server: %s" % (
            len(space["previous_copies"]), _copies_advice(space["previous_copies"], drop_how)))
    return dict(base, changed=swapped, terminated=terminated, event_logged=logged, row_counts=counts,
                warnings=warnings,
                duration_s=round(duration_ms / 1000.0, 3), drop_previous=drop_cmd,
                msg="restored %s into %s (version %s, taken %s; sha256 verified); the database as it was is kept as "
                    "%s (drop it when no longer needed: %s)%s" % (
                        path, target, manifest.get("schema_version") or "base", manifest.get("started_at"), old_db,
                        drop_cmd, "; terminated %d session(s)" % len(terminated) if terminated else ""))


def _check_copy(copy_url, manifest, bindir, path, p):
    """Problems of the restored copy against its manifest (empty when it is right), and its row counts."""
    problems = []
    counts = {}
    conn = connect(copy_url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')")
            present = set(r[0] for r in cur.fetchall())
            missing = sorted(_archive_tables(bindir, path) - present)
            if missing:
                problems.append("tables of the archive missing from the copy: %s" % ", ".join(missing[:10]))
            applied = [a["version"] for a in _applied(cur)]
            if manifest.get("applied") is not None and applied != list(manifest["applied"]):
                problems.append("migrations.history of the copy is %s, the manifest says %s" % (
                    ", ".join(applied) or "empty", ", ".join(manifest["applied"]) or "empty"))
            if manifest.get("row_counts"):
                for table, rows in sorted(manifest["row_counts"].items()):
                    schema, _, name = table.partition(".")
                    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, name).as_string(cur),))
                    if not cur.fetchone()[0]:
                        problems.append("%s missing (the manifest counts %s rows)" % (table, rows))
                        continue
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
                    counts[table] = cur.fetchone()[0]
                    if counts[table] != rows:
                        problems.append("%s has %d rows, the manifest %d" % (table, counts[table], rows))
            # The run lease in a dump is a snapshot of a run long gone: the restored database starts free.
            cur.execute("SELECT to_regclass('migrations.lock') IS NOT NULL")
            if cur.fetchone()[0]:
                cur.execute("DELETE FROM migrations.lock")
    finally:
        conn.close()
    return problems, counts


def _swap(cur, dbname, new_db, old_db, p, base, url, started):
    """Rename the current database away and the copy into its place, in one transaction.

    ALTER DATABASE ... RENAME refuses while anyone is connected to the database (55006). With
    terminate_connections, new connections are held off (ALLOW_CONNECTIONS false) while the client sessions are
    terminated; the setting is restored on the kept database whatever happens. Autovacuum workers are always
    terminated (they restart on their own); any other server process (a walsender, a background worker) that
    connected since the pre-check fails the swap, naming it: it is never terminated.
    """
    terminated = []
    deadline = time.time() + max(int(p.get("swap_timeout") or 15), 1)
    blocked = False
    try:
        if p.get("terminate_connections"):
            cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname)))
            blocked = True
        while True:
            sessions = _sessions(cur, dbname)
            others = [s for s in sessions if s["backend_type"] not in CLIENT_BACKENDS + SELF_RESTARTING]
            if others:
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, (
                    "the restored copy could not be swapped in for %s: server process(es) that are not client "
                    "sessions connected to it: %s. They are never terminated by the restore. The copy was dropped; "
                    "%s is unchanged. Stop them, then re-run" % (dbname, _describe_sessions(others),
                                                                   describe_target(url))),
                    dict(base, refused="server_processes", server_processes=others))
            for s in sessions:
                if s["backend_type"] in SELF_RESTARTING:
                    # Autovacuum workers don't belong to anyone; they restart on their own.
                    cur.execute("SELECT pg_terminate_backend(%s)", (s["pid"],))
                elif s["backend_type"] == "client backend" and p.get("terminate_connections"):
                    # A parallel worker goes with its leader.
                    cur.execute("SELECT pg_terminate_backend(%s)", (s["pid"],))
                    terminated.append(s)
            try:
                cur.execute("BEGIN")
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname),
                                                                              sql.Identifier(old_db)))
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(new_db),
                                                                              sql.Identifier(dbname)))
                cur.execute("COMMIT")
                break
            except psycopg2.Error as exc:
                cur.execute("ROLLBACK")
                err = pg_error(exc)
                if err["sqlstate"] != "55006" or time.time() > deadline:
                    left = _sessions(cur, dbname)
                    _drop_db(cur, new_db)
                    _restore_failed(url, p, started, (
                        "the restored copy could not be swapped in for %s: %s%s. The copy was dropped; %s is "
                        "unchanged. %s" % (
                            dbname, format_pg_error(err), " (still connected: %s)" % _describe_sessions(left)
                            if left else "", describe_target(url),
                            "Re-run with the sessions stopped, or: %s" % _cmd(
                                p.get("host_label"), "-e rollback_mode=restore",
                                "-e rollback_terminate_connections=true")
                            if not p.get("terminate_connections") else "Re-run when they are gone")),
                        dict(base, sqlstate=err["sqlstate"], blocking_sessions=left))
                time.sleep(0.1 + random.random() * 0.1)
    finally:
        if blocked:
            # The kept database (renamed or not) accepts connections again.
            for name in (old_db, dbname):
                try:
                    cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
                except psycopg2.Error:
                    pass
    return terminated


# =========================================================================== entry point

def run(params, check_mode=False):
    p = _defaults(params)
    if p["mode"] == "restore":
        # A restore has no separate plan: step=plan is its check mode (read-only).
        return run_restore(p, check_mode or p["step"] == "plan")
    if p["step"] == "plan":
        return plan_revert(p, check_mode)
    return run_revert(p, check_mode)


SPEC_OPTIONS = dict(mutually_exclusive=[("rollback_to", "versions")])


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_rollback.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    try:
        result = run(params, check_mode=check_mode)
    except LedgerError as exc:
        return dict(redact_obj(exc.fields), failed=True, msg=redact(exc.msg))
    except psycopg2.Error as exc:
        err = pg_error(exc)
        return dict(failed=True, sqlstate=err["sqlstate"],
                    msg="rollback of %s failed: %s" % (describe_target(params["database_url"]), format_pg_error(err)))
    except Exception as exc:  # noqa: BLE001 - an operator gets a message, never a traceback
        return dict(failed=True,
                    msg="ledger_rollback failed unexpectedly on %s: %s: %s (a bug: please report it with this "
                        "message)" % (describe_target(params["database_url"]), type(exc).__name__,
                                      redact(str(exc))))
    return redact_obj(result)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True, **SPEC_OPTIONS)
    result = result_of(module.params, check_mode=module.check_mode)
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
