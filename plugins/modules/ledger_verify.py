#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runbook's post-migration checks and staging checklist, proven on the target itself."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_verify
short_description: Prove the ledger's guarantees on a migrated PostgreSQL target, leaving no trace
description:
  - Runs every verification of the applied ledger migrations (0008-0011) in one call and returns
    each check by name, passed or failed with the relation concerned and what was observed.
  - Structure (catalog) checks, the runbook's own post-migration checks, and behaviour with real
    rows of two throwaway tenants as the application role, inside one transaction that is always
    rolled back (every check in a savepoint, so one failure does not hide the others).
  - Only the applied migrations are checked (C(migrations.history), or object existence when
    there is no history); with a history, the objects of unapplied migrations must be absent.
  - With O(pgbouncer_url), the tenant-context checks run again through PgBouncer (transaction
    pooling) and a leak check proves a transaction-local context never reaches the next client's
    transaction on the same server connection.
  - With O(health_url) / O(jwks_url), the application's health endpoint must answer 200 within
    O(http_timeout) and its JWKS C(kid)s must equal the active keys of C(s2s_jwks_public_keys).
  - Leaves nothing behind, proven cheaply on a production-sized ledger (no full count of any
    table) - after the rollback, no row of its two throwaway tenants (looked up by
    C(community_id), indexed) nor with its own webhook event ids or JWKS kid (looked up by key)
    remains; settings and catalog object counts are equal before and after.
    On a real run it appends one C(verify) event to C(migrations.events) in its own short
    transaction; in check mode it writes nothing. Never reports changed.
options:
  database_url: {description: libpq URI of the target (the migration user)., type: str, required: true}
  app_role: {description: The application role whose rights are verified (SET LOCAL ROLE)., type: str, default: arrakis_app}
  pgbouncer_url: {description: libpq URI of the same database through PgBouncer in transaction mode., type: str}
  health_url:
    description:
      - The application's health endpoint (HTTP 200 expected).
      - May carry credentials (user:password@ is sent as HTTP basic auth, or a token in the query); never
        shown, checks name it as host:port/path only.
    type: str
  jwks_url: {description: "The application's JWKS endpoint (JSON with a keys array); never shown, like O(health_url).", type: str}
  jwks_issuer: {description: Compare only the active keys of this issuer (default all issuers)., type: str}
  http_timeout: {description: Seconds the HTTP endpoints have to answer., type: float, default: 5}
  statement_timeout_ms: {description: statement_timeout of the verification transaction., type: int, default: 30000}
  lock_timeout_ms: {description: lock_timeout of the verification transaction (never queue the application)., type: int, default: 2000}
  leak_attempts: {description: Attempts to land two PgBouncer clients on the same server connection., type: int, default: 20}
  run_id: {description: Run id recorded with the verify event., type: str}
  record_event: {description: Append a verify event to migrations.events on a real run., type: bool, default: true}
  limit: {description: The inventory limit used in the next-command hints., type: str, default: "<environment>"}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
  migrations_dir:
    description:
      - The migration set whose C(NNNN_name.verify.json) files say what each version must have (objects,
        columns and types, tenant scoping, append-only columns, the application's privileges, behaviours).
      - Default is the collection's own C(files/migrations) (only when the module runs in process).
    type: path
author: Arrakis platform team (@arrakis-platform)
"""

EXAMPLES = r"""
- name: Verify the ledger on the target
  ledger_verify:
    database_url: "{{ verify_database_url }}"
    pgbouncer_url: "{{ verify_pgbouncer_url | default(omit) }}"
    health_url: https://app.example.org/healthz
    limit: staging
"""

RETURN = r"""
checks: {description: "Every check: id, group, name, relation, version, status (passed/failed/skipped), observed, expected.", type: list, returned: always}
failed_checks: {description: Ids of the failed checks., type: list, returned: always}
passed: {description: Number of passed checks., type: int, returned: always}
versions: {description: The applied versions that were verified., type: list, returned: always}
versions_source: {description: "history (migrations.history) or objects (detected by existence).", type: str, returned: always}
leftover_rows: {description: "Rows of verify's tenants and keys still present after its rollback, per table ({} when none).", type: dict, returned: always}
event_logged: {description: Whether a verify event was appended to migrations.events., type: bool, returned: always}
verification_failed: {description: "True when a check failed or verify could not run (also under failed_when: false).", type: bool, returned: always}
"""

import time
import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, log_event_autonomous, new_run_id, redact,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_behaviour import (
    Behaviour,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_probes import (
    _safe_url,
    applied_tables,
    check_health,
    check_jwks,
    leak_check,
    leftover_rows,
    object_snapshot,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    Expectations,
    Report,
    applied_versions,
    err_text,
    short,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_structure import (
    check_runbook_catalog,
    check_structure,
)

ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    app_role=dict(type="str", default="arrakis_app"),
    pgbouncer_url=dict(type="str", no_log=True),
    health_url=dict(type="str", no_log=True),
    jwks_url=dict(type="str", no_log=True),
    jwks_issuer=dict(type="str"),
    http_timeout=dict(type="float", default=5),
    statement_timeout_ms=dict(type="int", default=30000),
    lock_timeout_ms=dict(type="int", default=2000),
    leak_attempts=dict(type="int", default=20),
    run_id=dict(type="str"),
    record_event=dict(type="bool", default=True),
    limit=dict(type="str", default="<environment>"),
    connect_timeout=dict(type="int", default=10),
    migrations_dir=dict(type="path"),
)


# --------------------------------------------------------------------------- the run

def run_behaviour(conn, rep, group, applied, app_role, marker, full, statement_timeout_ms, lock_timeout_ms, exp):
    """One transaction, always rolled back; returns the tenants it used."""
    conn.autocommit = False
    beh = Behaviour(conn, rep, group, applied, app_role, marker, exp, full=full)
    try:
        cur = beh.cur
        cur.execute("SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true),"
                    " set_config('idle_in_transaction_session_timeout', '60000', true)",
                    (str(statement_timeout_ms), str(lock_timeout_ms)))
        beh.run()
    finally:
        conn.rollback()
        conn.autocommit = True
    return list(beh.tenants.values())


def next_steps(failed, limit, exp):
    groups = {c["group"] for c in failed}
    steps = []
    if groups & {"structure", "runbook", "behaviour", "cleanup"}:
        versions = sorted({c["version"] for c in failed if c.get("version") in exp.known_versions})
        steps.append("look for drift: 'ansible-playbook playbooks/status.yml -l %s'" % limit)
        if versions:
            first = exp.known_versions.index(versions[0])
            prev = exp.known_versions[first - 1] if first > 0 else "base"
            steps.append("repair the objects named above as files/migrations/%s define%s them (where the ledger"
                         " holds no data worth keeping, 'ansible-playbook playbooks/rollback.yml -l %s -e rollback_to=%s'"
                         " then 'ansible-playbook playbooks/migrate.yml -l %s' re-creates them: reverting drops"
                         " their data; or restore the backup: 'ansible-playbook playbooks/rollback.yml -l %s"
                         " -e rollback_mode=restore')"
                         % (", ".join(exp.files[v] for v in versions), "s" if len(versions) == 1 else "",
                            limit, prev, limit, limit))
    if "pgbouncer" in groups:
        steps.append("check PgBouncer: pool_mode = transaction, and the application sets its tenant with"
                     " app.set_community_context() / set_config(..., true) inside a transaction, never SET")
    if "http" in groups:
        steps.append("check the application (its logs; 'curl -sS -m 5 <url>'); the JWKS endpoint must serve"
                     " exactly the active rows of s2s_jwks_public_keys")
    steps.append("then re-run 'ansible-playbook playbooks/verify.yml -l %s'" % limit)
    return "; ".join(steps)


def format_failure(target, failed, total, versions, limit, exp):
    lines = ["verify failed on %s: %d of %d checks failed (verified versions: %s)"
             % (target, len(failed), total, ", ".join(versions) or "none")]
    for c in failed:
        line = "- %s on %s: %s" % (c["group"] + "." + c["name"], c["relation"] or "-", c["observed"])
        if c.get("expected"):
            line += " (expected: %s)" % c["expected"]
        lines.append(line)
    lines.append("Next: " + next_steps(failed, limit, exp) + ".")
    return "\n".join(lines)


def abort(check_mode, p, url, run_id, result, msg, **extra):
    """verify could not finish: log that (real runs) and fail with the message."""
    if not check_mode and p["record_event"]:
        result["event_logged"] = log_event_autonomous(url, run_id, "verify", "error",
                                                      detail={"target": result["target"], "error": msg})
    raise LedgerError(msg, **dict(result, **extra))


def run(p, check_mode=False):
    """Every check on one target; the result, or LedgerError(msg, **result) when verification failed."""
    url = p["database_url"]
    target = describe_target(url)
    run_id = p["run_id"] or new_run_id()
    exp = Expectations.load(p["migrations_dir"])
    rep = Report(exp)
    result = {"changed": False, "target": target, "run_id": run_id, "checks": rep.checks, "failed_checks": [],
              "verification_failed": True,
              "passed": 0, "versions": [], "versions_source": None, "leftover_rows": {}, "event_logged": False}
    started = time.monotonic()
    marker = uuid.uuid4().hex[:12]
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    except LedgerError as exc:
        raise LedgerError("%s. Next: check database_url and that the target is up ('ansible-playbook"
                          " playbooks/precheck.yml -l %s')." % (exc.msg, p["limit"]), **result)
    try:
        cur = conn.cursor()
        applied, source = applied_versions(cur, exp)
        known = [v for v in applied if v in exp.known_versions]
        result.update(versions=known, versions_source=source,
                      unknown_versions=[v for v in applied if v not in exp.known_versions])
        objects_before = object_snapshot(cur)

        check_structure(cur, rep, known, source, p["app_role"], exp)
        check_runbook_catalog(cur, rep, known, exp)
        tenants = run_behaviour(conn, rep, "behaviour", known, p["app_role"], marker, True,
                                p["statement_timeout_ms"], p["lock_timeout_ms"], exp)

        if p["pgbouncer_url"]:
            if known:
                try:
                    bconn = connect(p["pgbouncer_url"], autocommit=True, connect_timeout=p["connect_timeout"])
                except LedgerError as exc:
                    rep.add("pgbouncer", "connect", describe_target(p["pgbouncer_url"]), False, exc.msg)
                else:
                    try:
                        tenants += run_behaviour(bconn, rep, "pgbouncer", known, p["app_role"], marker + "p", False,
                                                 p["statement_timeout_ms"], p["lock_timeout_ms"], exp)
                    finally:
                        bconn.close()
            leak_check(p["pgbouncer_url"], rep, p["leak_attempts"], p["connect_timeout"], "0008" in known)

        if p["health_url"]:
            check_health(rep, p["health_url"], p["http_timeout"])
        if p["jwks_url"]:
            check_jwks(rep, cur, p["jwks_url"], p["http_timeout"], p["jwks_issuer"], known)

        # Nothing left behind: rows (by verify's own tenants and keys), settings, objects.
        markers = [marker, marker + "p"]
        leftovers = leftover_rows(conn, tenants, markers, known, p["statement_timeout_ms"], exp)
        result["leftover_rows"] = leftovers
        tables = [short(rel) for rel in applied_tables(known, exp)]
        rep.add("cleanup", "no_rows_left", None, not leftovers,
                ("verify's rows remain after its rollback: %s" % leftovers) if leftovers else
                "no row of verify's %d tenant(s) or keys in %s" % (len(tenants), ", ".join(tables) or "no ledger table"),
                "none of verify's rows (its tenants' community_id, its webhook event ids and JWKS kid)")
        cur.execute("SELECT current_setting('app.community_id', true), current_user::text, session_user::text")
        setting, cur_user, sess_user = cur.fetchone()
        rep.add("cleanup", "no_settings_left", None, setting in (None, "") and cur_user == sess_user,
                "app.community_id = %r, current_user = %s" % (setting, cur_user), "no context, role reset")
        objects_after = object_snapshot(cur)
        rep.add("cleanup", "no_objects_left", None, objects_after == objects_before,
                "catalog counts before %s, after %s" % (objects_before, objects_after), "equal")
    except LedgerError as exc:
        conn.close()
        abort(check_mode, p, url, run_id, result, "verify could not run on %s: %s" % (target, exc.msg))
    except psycopg2.Error as exc:
        conn.close()
        abort(check_mode, p, url, run_id, result,
              "verify could not run on %s: %s. Next: check the target's health, then re-run"
              " 'ansible-playbook playbooks/verify.yml -l %s'." % (target, err_text(exc), p["limit"]),
              sqlstate=exc.pgcode)
    except Exception as exc:  # noqa: BLE001 - an operator gets a message, never a traceback
        conn.close()
        abort(check_mode, p, url, run_id, result,
              "verify could not run on %s: internal error %s: %s. Next: re-run with -vvv and report it"
              % (target, type(exc).__name__, redact(str(exc))))
    conn.close()

    failed = rep.failed()
    result["failed_checks"] = [c["id"] for c in failed]
    result["passed"] = sum(1 for c in rep.checks if c["status"] == "passed")
    result["duration_ms"] = int((time.monotonic() - started) * 1000)
    outcome = "failed" if failed else "passed"
    if not check_mode and p["record_event"]:
        result["event_logged"] = log_event_autonomous(
            url, run_id, "verify", outcome, duration_ms=result["duration_ms"],
            detail={"target": target, "versions": result["versions"], "passed": result["passed"],
                    "failed": result["failed_checks"], "pgbouncer": bool(p["pgbouncer_url"]),
                    "health_url": _safe_url(p["health_url"]) or None, "jwks_url": _safe_url(p["jwks_url"]) or None})
    result["verification_failed"] = bool(failed)
    if failed:
        raise LedgerError(format_failure(target, failed, len(rep.checks), result["versions"], p["limit"], exp), **result)
    if not result["versions"]:
        result["msg"] = "verify on %s: no ledger migration applied, nothing to verify (%d checks passed)" % (
            target, result["passed"])
    else:
        result["msg"] = "verify passed on %s: %d checks (versions %s%s)" % (
            target, result["passed"], ", ".join(result["versions"]), ", through PgBouncer too" if p["pgbouncer_url"] else "")
    return result


SPEC_OPTIONS = {}


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_verify.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    return module_result("ledger_verify", run, params, check_mode,
                         unexpected="verify could not run on {target}: internal error {error}: {detail}. Next: re-run"
                                    " with -vvv and report it", unexpected_fields={"changed": False})


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
