#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runbook's pre-migration checklist, automated and stricter: every check in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_precheck
short_description: Run every pre-migration check on a PostgreSQL target and report them all
description:
  - Runs all checks of the pre-migration checklist in one call and returns each with its name,
    whether it passed, the observed value, the threshold and the offending sessions; then fails
    when any check failed, with a message listing each failed check and the next command.
  - "Read-only, except two things it does only in a real run after every check passed, and reports
    as changed: it creates the missing backup directory (0700) when something is pending, and,
    only when O(terminate_idle_minutes) is set, it terminates idle sessions older than that
    (never its own) and lists each."
  - Records a C(precheck) event in C(migrations.events) on real runs when the records exist
    (or, for a passing run, when something is pending). C(--check) writes nothing.
options:
  database_url: {description: libpq URI of the target., type: str, required: true}
  migrations_dir: {description: Directory of the migration set (NNNN_name.sql)., type: path}
  target: {description: Highest version to apply (default the newest in the set)., type: str}
  allow_out_of_order: {description: Accept pending files older than the newest applied one., type: bool, default: false}
  rehearse: {description: Rehearse the pending migrations in a rolled-back transaction., type: bool, default: true}
  rehearse_statement_timeout:
    description:
      - statement_timeout of each rehearsed statement (PostgreSQL units, e.g. 30s, 500ms, 2min).
      - A statement that runs longer is cancelled and the check reports the set as not fully rehearsed.
    type: str
    default: 30s
  rehearse_lock_timeout:
    description:
      - lock_timeout of the rehearsal; a lock not obtained in time is not retried, the check reports
        the set as not fully rehearsed (the rehearsal never queues production traffic for longer).
    type: str
    default: 2s
  lock_policy:
    description:
      - What a lock impact does (a lock above SHARE UPDATE EXCLUSIVE held while working on, or a rewrite of, a
        pre-existing table with more than O(lock_rows_threshold) estimated rows), unless the file's header
        declares it with C(-- ledger:allow-lock schema.table).
      - C(refuse) fails the check before any change; C(warn) reports it.
    type: str
    choices: [refuse, warn]
    default: warn
  lock_rows_threshold: {description: Tables with more estimated rows than this are large., type: int, default: 100000}
  impact_profile:
    description:
      - Staging's impact profile of the set (from the promotion stamp). The policy is enforced from it at this
        target's table sizes, and a statement it shows as heavy is not rehearsed here.
    type: list
    elements: dict
  compare_squawk: {description: Compare the observed profile with squawk's verdict per statement., type: bool, default: true}
  accepted_versions: {description: Accepted PostgreSQL major versions., type: list, elements: int, default: [15]}
  app_role: {description: The application role that must exist with LOGIN., type: str, default: arrakis_app}
  required_roles: {description: Roles the migration set needs., type: list, elements: str, default: [arrakis_app, arrakis_admin]}
  max_connections: {description: Client connections must stay below this (default 80% of the server's max_connections)., type: int}
  pgbouncer_admin_url: {description: libpq URI of PgBouncer's admin console (database pgbouncer)., type: str}
  pgbouncer_max_waiting: {description: Highest acceptable number of waiting PgBouncer clients., type: int, default: 0}
  pgbouncer_max_server_connections: {description: Highest acceptable number of PgBouncer server connections (none to only report)., type: int}
  long_tx_seconds: {description: Age above which an active transaction or an idle-in-transaction session refuses the run., type: int, default: 300}
  lock_schemas: {description: Schemas whose relations must have no queued lock waits., type: list, elements: str, default: [public, app, migrations]}
  lock_tables: {description: More relations (schema.table) to watch; the pending SQL's tables are added., type: list, elements: str, default: []}
  max_replication_lag: {description: Highest acceptable replay lag of a replica in seconds., type: float, default: 60}
  backup_dir: {description: "Where the backup goes (checked for space, writability and mode).", type: path}
  backup_space_margin: {description: Free space needed as a multiple of the database size., type: float, default: 1.2}
  environment: {description: The environment (production requires a maintenance window)., type: str, default: unknown}
  maintenance_window_ack: {description: Explicit acknowledgement of the maintenance window., type: bool, default: false}
  maintenance_db: {description: "Database reached when the target refuses connections, to say why (its datallowconn).", type: str, default: postgres}
  maintenance_window: {description: "Window {start: 'HH:MM', end: 'HH:MM', days: [mon, ...], timezone: UTC}.", type: dict}
  terminate_idle_minutes: {description: "Opt-in remedy: terminate idle sessions older than this many minutes.", type: float}
  run_id: {description: Run id for the event., type: str}
  run_options: {description: The ansible-playbook options (-i -l -e vault) every next command carries; set by the action plugin., type: list, elements: str}
  rerun_command: {description: The command an operator runs after fixing a refusal., type: str}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
author: Arrakis platform team (@arrakis-platform)
"""

EXAMPLES = r"""
- name: Check the target
  ledger_precheck:
    database_url: "{{ database_url }}"
    migrations_dir: files/migrations
    backup_dir: /var/backups/ledger/staging
"""

RETURN = r"""
checks:
  description: "Every check: name, passed (true, false, or null when it could not run), observed, threshold, offenders, message, next."
  type: list
  returned: always
failed_checks: {description: Names of the failed checks., type: list, returned: always}
pending: {description: Pending versions., type: list, returned: always}
applied: {description: Applied versions., type: list, returned: always}
schema_version: {description: Newest applied version (null when none)., type: str, returned: always}
impact:
  description: "The impact profile (files: per statement the locks, rewrites, rows, ms), the impacts found, squawk's
    disagreements, table sizes that differ from staging's >10x; null without a rehearsal or a stamp profile."
  type: dict
  returned: always
impact_lines: {description: The impact table and the policy's verdict as lines., type: list, returned: when profiled}
terminated: {description: "Sessions ended by terminate_idle_minutes (or that would be, in check mode).", type: list, returned: always}
"""

import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module, with_defaults
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import RUN_OPTIONS_SPEC, playbook_command
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, format_pg_error, log_event_autonomous,
    pg_error, redact, redact_obj,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import load_migration_set
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_dir import check_backup_dir, ensure_backup_dir
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_leftovers import (
    diagnose_refused, lease_check, leftovers_check,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_precheck_migrations import (
    NOT_REHEARSED_SQLSTATES,
    check_lock_impact,
    check_migrations,
    check_rehearsal,
    stamp_plan,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_precheck_server import (
    check,
    check_backup_privilege,
    check_connections,
    check_idle_in_transaction,
    check_lock_waits,
    check_long_running,
    check_maintenance,
    check_pgbouncer,
    check_replication,
    check_roles,
    check_stage_privileges,
    down_drops,
    check_version,
    not_run,
    terminate_idle,
)

ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    migrations_dir=dict(type="path"),
    target=dict(type="str"),
    allow_out_of_order=dict(type="bool", default=False),
    rehearse=dict(type="bool", default=True),
    rehearse_statement_timeout=dict(type="str", default="30s"),
    rehearse_lock_timeout=dict(type="str", default="2s"),
    lock_policy=dict(type="str", choices=["refuse", "warn"], default="warn"),
    lock_rows_threshold=dict(type="int", default=100000),
    impact_profile=dict(type="list", elements="dict"),
    compare_squawk=dict(type="bool", default=True),
    accepted_versions=dict(type="list", elements="int", default=[15]),
    app_role=dict(type="str", default="arrakis_app"),
    required_roles=dict(type="list", elements="str", default=["arrakis_app", "arrakis_admin"]),
    max_connections=dict(type="int"),
    pgbouncer_admin_url=dict(type="str", no_log=True),
    pgbouncer_max_waiting=dict(type="int", default=0),
    pgbouncer_max_server_connections=dict(type="int"),
    long_tx_seconds=dict(type="int", default=300),
    lock_schemas=dict(type="list", elements="str", default=["public", "app", "migrations"]),
    lock_tables=dict(type="list", elements="str", default=[]),
    max_replication_lag=dict(type="float", default=60),
    backup_dir=dict(type="path"),
    backup_space_margin=dict(type="float", default=1.2),
    environment=dict(type="str", default="unknown"),
    maintenance_window_ack=dict(type="bool", default=False),
    maintenance_window=dict(type="dict"),
    maintenance_db=dict(type="str", default="postgres"),
    terminate_idle_minutes=dict(type="float"),
    run_id=dict(type="str"),
    run_options=RUN_OPTIONS_SPEC,
    rerun_command=dict(type="str"),
    connect_timeout=dict(type="int", default=10),
)


# --------------------------------------------------------------------------- the run

def _defaults(params):
    return with_defaults(ARGUMENT_SPEC, params)


def _server_facts(cur):
    cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
                " pg_database_size(current_database()), to_regclass('migrations.events') IS NOT NULL")
    version, num, size, records = cur.fetchone()
    return {"server_version": version, "server_major": num // 10000, "db_size": size, "records": records}


def _down_drops(migrations_dir):
    """What the set's down scripts drop; an unreadable set is the migration_set check's to report."""
    if not migrations_dir:
        return []
    try:
        texts = []
        for m in load_migration_set(migrations_dir):
            if m.down_path:
                with open(m.down_path, encoding="utf-8", errors="replace") as fh:
                    texts.append(fh.read())
        return down_drops(texts)
    except (LedgerError, OSError):
        return []


def run_precheck(params, check_mode=False, now_utc=None):
    """Every check, in one call. Returns the result dict; result['failed'] tells whether the run must stop."""
    p = _defaults(params)
    started = time.time()
    url = p["database_url"]
    target = describe_target(url)
    checks = []
    facts = None
    conn = None
    state = {"applied": [], "pending": [], "pending_items": [], "tables": set(), "problem": False}
    terminated = []
    changed = False
    backup_state = None
    rehearsal_results = None
    impact = None
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    except LedgerError as exc:
        # The server may answer while the database refuses (datallowconn false): say why, through the
        # maintenance database, instead of blaming the URL or pg_hba.conf.
        why = diagnose_refused(url, p["maintenance_db"], p["connect_timeout"])
        checks.append(check("server_version", False, {"reachable": False}, {"accepted_majors": p["accepted_versions"]},
                            message="%s: %s" % (exc.msg, why[0]) if why else exc.msg,
                            next_step=why[1] if why else "check database_url, the network and the server's "
                                                         "pg_hba.conf, then re-run"))
    try:
        if conn is not None:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '30s'")
                facts = _server_facts(cur)
                checks.append(check_version(facts, p["accepted_versions"]))
                checks.append(check_backup_privilege(cur))
                checks.extend(check_roles(cur, p["app_role"], p["required_roles"]))
                checks.append(check_stage_privileges(cur, p["app_role"], _down_drops(p.get("migrations_dir"))))
                checks.extend(check_replication(cur, p["max_replication_lag"]))
                # Scratch copies of interrupted restores and databases kept by restores, with size and age.
                checks.append(leftovers_check(cur, Target(url).dbname))
                # Whether a run holds the target (or a killed one still does, until its lease expires).
                checks.append(lease_check(cur, Target(url).dbname))
        else:
            for name in ("backup_privilege", "app_role_login", "required_roles", "stage_privileges",
                         "replication_lag",
                         "replication_slots"):
                checks.append(not_run(name, "no connection to %s" % target))

        # The backup directory: space for the dump (database size with a margin), writable, private.
        if p.get("backup_dir"):
            needed = int(facts["db_size"] * p["backup_space_margin"]) if facts else None
            backup_state = check_backup_dir(p["backup_dir"], needed)
            observed = {"path": backup_state["path"], "exists": backup_state["exists"], "mode": backup_state["mode"],
                        "writable": backup_state["writable"], "free_bytes": backup_state["free_bytes"]}
            if backup_state["would_create"]:
                observed["would_create"] = "%s (mode 0700)" % backup_state["path"]
            checks.append(check(
                "backup_dir", not backup_state["problems"], observed,
                {"free_bytes_at_least": needed, "margin": p["backup_space_margin"], "mode": "no access for others",
                 "writable": True}, [{"problem": x} for x in backup_state["problems"]],
                "; ".join(backup_state["problems"]) if backup_state["problems"] else
                "%s %s, %s free, needs %s" % (backup_state["path"],
                                              "will be created 0700" if backup_state["would_create"] else
                                              "mode %s writable" % backup_state["mode"],
                                              human_bytes(backup_state["free_bytes"]), human_bytes(needed)),
                None if not backup_state["problems"] else "fix the backup directory as said, or set backup_dir"))
        else:
            checks.append(check("backup_dir", True, "not configured", None,
                                message="no backup_dir given: not checked"))

        checks.append(check_maintenance(p["environment"], p["maintenance_window_ack"], p.get("maintenance_window"),
                                        now_utc))

        if conn is not None:
            mig_checks, state = check_migrations(conn, p)
            checks.extend(mig_checks)
        elif p.get("migrations_dir"):
            checks.append(not_run("migration_set", "no connection"))

        # The opt-in remedy runs only when every check so far passed, so a run refused for
        # another reason ends nobody's session; the session checks below then see its effect.
        static_failed = [c["name"] for c in checks if c["passed"] is False]
        if conn is not None and p.get("terminate_idle_minutes"):
            if static_failed:
                checks.append(check("terminate_idle", None, "not run: other checks failed (%s)" % ", ".join(
                    static_failed), {"idle_minutes": p["terminate_idle_minutes"]},
                    message="idle sessions not terminated because the run is refused anyway"))
            else:
                with conn.cursor() as cur:
                    terminated = terminate_idle(cur, p["terminate_idle_minutes"], check_mode)
                changed = changed or any(t["terminated"] for t in terminated)
                verb = "would terminate" if check_mode else "terminated"
                checks.append(check("terminate_idle", True, {verb: len(terminated)},
                                    {"idle_minutes": p["terminate_idle_minutes"]}, terminated,
                                    "%s %d idle session(s) older than %g min%s" % (
                                        verb, len(terminated), p["terminate_idle_minutes"],
                                        ": " + ", ".join("pid %s (%s, %s)" % (t["pid"], t["user"],
                                                                              t["application_name"])
                                                         for t in terminated) if terminated else "")))

        if conn is not None:
            with conn.cursor() as cur:
                checks.append(check_connections(cur, p.get("max_connections")))
                session_checks = [check_long_running(cur, p["long_tx_seconds"]),
                                  check_idle_in_transaction(cur, p["long_tx_seconds"]),
                                  check_lock_waits(cur, p["lock_schemas"],
                                                   sorted(set(p.get("lock_tables") or []) | state["tables"]))]
            checks.extend(session_checks)
            # Last: the rehearsal takes the migrations' locks (then rolls back), so it runs only
            # when no session would make it wait, and never runs what staging measured as heavy.
            planned = stamp_plan(conn, p, state) if not state["problem"] else None
            rehearsal, rehearsal_results = check_rehearsal(
                conn, url, p, state, [c["name"] for c in session_checks if c["passed"] is False],
                stop_before=planned[1] if planned else None)
            if rehearsal is not None:
                checks.append(rehearsal)
            lock_impact, impact = check_lock_impact(p, rehearsal_results, planned, state["pending_items"])
            if lock_impact is not None:
                checks.append(lock_impact)
        else:
            for name in ("connections", "long_running_queries", "idle_in_transaction", "lock_waits"):
                checks.append(not_run(name, "no connection"))
        checks.append(check_pgbouncer(p.get("pgbouncer_admin_url"), p["pgbouncer_max_waiting"],
                                      p.get("pgbouncer_max_server_connections"), p["connect_timeout"]))
    except psycopg2.Error as exc:
        err = pg_error(exc)
        checks.append(check("precheck_query", False, {"sqlstate": err["sqlstate"]}, None,
                            message="a precheck query failed on %s: %s" % (target, format_pg_error(err)),
                            next_step="grant the migration role pg_monitor (or run it as a superuser), then re-run"))
    finally:
        if conn is not None:
            conn.close()

    failed = [c for c in checks if c["passed"] is False]
    backup_dir_created = False
    if not failed and not check_mode and backup_state and backup_state["would_create"] and state["pending"]:
        try:
            backup_dir_created = ensure_backup_dir(backup_state["path"])
            changed = changed or backup_dir_created
        except OSError as exc:
            failed.append(check("backup_dir", False, {"path": backup_state["path"]}, None,
                                message="cannot create %s: %s" % (backup_state["path"], exc)))
            checks.append(failed[-1])

    applied = state["applied"]
    result = {
        "changed": changed, "failed": bool(failed), "target": target, "checks": redact_obj(checks),
        "failed_checks": [c["name"] for c in failed], "passed_checks": [c["name"] for c in checks if c["passed"]],
        "pending": state["pending"], "applied": applied, "schema_version": applied[-1] if applied else None,
        "terminated": terminated, "backup_dir_created": backup_dir_created,
        "server_version": facts["server_version"] if facts else None,
        "database_size_bytes": facts["db_size"] if facts else None,
        "environment": p["environment"], "duration_s": round(time.time() - started, 3), "check_mode": check_mode,
        "impact": impact,
    }
    rerun = p.get("rerun_command") or "the same ansible-playbook command (to re-check alone: `%s`)" % (
        playbook_command("precheck"))
    if failed:
        lines = ["precheck refused %s: %d of %d checks failed (nothing was changed)" % (
            target, len(failed), len([c for c in checks if c["passed"] is not None]))]
        for c in failed:
            lines.append("- %s: %s" % (c["name"], c["message"]))
            if c["name"] == "lock_impact":
                # The per-file table (what was not rehearsed here, and why) belongs to the refusal itself.
                observed = c.get("observed") if isinstance(c.get("observed"), dict) else {}
                lines.extend("  " + row for row in observed.get("table") or [])
            if c.get("next"):
                lines.append("  next: %s" % c["next"])
        # A rehearsal that stopped before a heavy statement passed, but the refusal must say what was not run.
        lines.extend("- rehearsal: " + c["message"] for c in checks
                     if c["name"] == "rehearsal" and c["passed"] and isinstance(c.get("observed"), dict)
                     and c["observed"].get("not_rehearsed_here"))
        lines.append("Then re-run: %s" % rerun)
        result["msg"] = redact("\n".join(lines))
    else:
        result["msg"] = "precheck passed on %s: %d checks, %d pending migration(s)%s%s" % (
            target, len([c for c in checks if c["passed"]]), len(state["pending"]),
            " (%s)" % ", ".join(state["pending"]) if state["pending"] else "",
            "; created %s 0700" % backup_state["path"] if backup_dir_created else "")
    impact_check = next((c for c in checks if c["name"] == "lock_impact"), None)
    # Shown on the screen only when there is something to say: an impact or a squawk disagreement.
    if impact_check is not None and (impact_check["observed"].get("impacts") or impact_check["observed"].get("squawk")):
        result["impact_lines"] = (["lock impact: %s" % impact_check["message"]] + impact_check["observed"]["table"]
                                  + ["squawk: %s line %s: %s" % (n.get("file"), n.get("line"), n["note"])
                                     if n.get("file") else "squawk: %s" % n["note"]
                                     for n in impact_check["observed"]["squawk"]])

    # The event: real runs only; never create the records schema for a refused run.
    if not check_mode and facts is not None and (facts["records"] or (state["pending"] and not failed)):
        if rehearsal_results:
            would_fail = [r for r in rehearsal_results if r["status"] == "would_fail"]
            incomplete = bool(would_fail) and would_fail[0].get("sqlstate") in NOT_REHEARSED_SQLSTATES
            log_event_autonomous(url, p.get("run_id") or "adhoc", "rehearse",
                                 "incomplete" if incomplete else "failed" if would_fail else "ok",
                                 version=(would_fail[0] if would_fail else rehearsal_results[-1])["version"],
                                 detail={"stage": "precheck", "results": [
                                     dict((k, r.get(k)) for k in ("version", "filename", "status", "sqlstate",
                                                                  "line", "message")) for r in rehearsal_results]})
        result["event_logged"] = log_event_autonomous(
            url, p.get("run_id") or "adhoc", "precheck", "refused" if failed else "passed",
            duration_ms=int(result["duration_s"] * 1000),
            detail={"failed_checks": result["failed_checks"], "pending": state["pending"],
                    "terminated": [t["pid"] for t in terminated if t["terminated"]],
                    "checks": [{"name": c["name"], "passed": c["passed"], "message": c["message"]} for c in checks]})
    else:
        result["event_logged"] = False
    return result


SPEC_OPTIONS = {}


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_precheck.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    return module_result("ledger_precheck", run_precheck, params, check_mode)


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
