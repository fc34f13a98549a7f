#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: apply, rehearse, report, baseline, accept or revert the ledger migrations."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_migrate
short_description: Apply numbered SQL migrations to PostgreSQL with history, checksums, a lease and rehearsal
description:
  - Applies the migrations of O(migrations_dir) (C(NNNN_name.sql), with optional C(NNNN_name.down.sql))
    to one PostgreSQL database, in version order, each in its own transaction together with its row in
    C(migrations.history) and its C(apply) event in C(migrations.events).
  - Before any change, every applied migration's file is compared with its recorded sha256 checksum;
    an edited, missing or renamed file stops the run (see O(action=accept_checksum) for intended edits).
  - Two runs against one database never interleave. The mutual exclusion is a lease row
    (C(migrations.lock)) with an expiry, not a session advisory lock, so it works through PgBouncer
    transaction pooling, and a runner that dies frees the database when its lease expires.
  - Every migration transaction runs with C(SET LOCAL lock_timeout) and C(statement_timeout); a lock
    timeout is retried with exponential back-off and jitter, a bounded number of times.
  - In check mode (C(--check)) every pending migration runs for real inside one transaction that is
    rolled back (a rehearsal); the module reports per file whether it would apply or fail (SQLSTATE,
    file, line) and writes nothing at all.
  - A file whose header contains C(-- ledger:no-transaction) runs statement by statement outside a
    transaction (for C(CREATE INDEX CONCURRENTLY)), on a connection of its own that is reset and closed
    after the file; after a failure the INVALID indexes it left are reported with their cleanup SQL.
    Through a connection pooler such files are refused before any change unless O(direct_url) is set.
  - A plain (session-level) C(SET), C(SET SESSION), C(RESET) or C(set_config(..., false)) in a
    transactional migration is refused when the set is read, with its file and line, because it would
    outlive the migration's transaction. Use C(SET LOCAL) or C(set_config(..., true)).
  - The engine lives in C(module_utils/ledger_engine.py); the migrate role's README describes every behaviour.
version_added: "1.0.0"
author: Arrakis platform team (@arrakis-platform)
options:
  database_url:
    description:
      - libpq URI of the target database (C(postgresql://user:password@host:port/db?sslmode=...)).
      - Never shown in output; messages name the target as C(user@host:port/db).
    type: str
    required: true
  migrations_dir:
    description:
      - Directory of the migration set. C(NNNN_name.sql) files are up migrations, C(NNNN_name.down.sql) their
        reverts; any other C(*.sql) name is refused, other files are ignored.
    type: path
    required: true
  action:
    description:
      - C(apply) applies the pending migrations up to O(target) (rehearses them in check mode).
      - C(status) reports applied (when, by whom, how long), pending and drifted migrations; read-only.
      - C(baseline) records the set up to O(baseline_version) as applied without running any file.
      - C(accept_checksum) records the current checksum (and name) of the applied file O(accept_version).
      - C(revert) runs the down scripts of the migrations above O(revert_to), newest first.
    type: str
    choices: [apply, status, baseline, accept_checksum, revert]
    default: apply
  target:
    description:
      - Highest version to apply (4 digits). Empty means the newest of the set.
      - A target below the applied version is refused (use O(action=revert)).
    type: str
  run_id:
    description:
      - Identifier of this run, written to every event and history row. Generated when empty.
    type: str
  run_options:
    description:
      - The options of the ansible-playbook run (-i, -l, each -e, vault options) that every next command carries.
      - Set by the collection's action plugin from the command line; a task rarely sets it.
    type: list
    elements: str
  lock_timeout:
    description:
      - C(lock_timeout) of every migration transaction (PostgreSQL duration such as C(2s) or C(500ms)).
      - Bounds how long application queries can queue behind a migration waiting for its lock.
    type: str
    default: 2s
  statement_timeout:
    description:
      - C(statement_timeout) of every migration statement; C(0) disables it.
    type: str
    default: '0'
  lock_retries:
    description:
      - How many times a migration that hit O(lock_timeout) (or a deadlock) is retried before the run fails.
    type: int
    default: 3
  lock_retry_backoff:
    description:
      - First back-off delay in seconds; it doubles at each retry and is multiplied by a random factor
        between 0.5 and 1.5 (jitter), capped at 30 seconds.
    type: float
    default: 0.5
  lock_wait:
    description:
      - Seconds to wait for another run's lease before failing with that run's identity.
      - Defaults to O(lock_ttl) + 30, so that a run started right after a runner was killed waits for the
        dead run's lease to expire and takes it over.
    type: float
  lock_ttl:
    description:
      - Lifetime in seconds of this run's lease; it is renewed while the run is alive, and a run that died
        frees the database after at most this long.
    type: float
    default: 60
  direct_url:
    description:
      - libpq URI reaching the same database B(directly), not through PgBouncer or another pooler.
      - Used only for the statements of C(-- ledger:no-transaction) files, which can't scope their settings to
        a transaction. Empty uses O(database_url), and then such files are refused when O(database_url) goes
        through a pooler (detected when the port it connects to differs from the server's C(port) setting).
      - Checked to reach the same database (name, oid, server start time); never shown in output.
    type: str
  allow_out_of_order:
    description:
      - Apply pending files older than the newest applied version instead of refusing them.
    type: bool
    default: false
  baseline_version:
    description:
      - With O(action=baseline), the version the database is already at (every version of the set up to it
        is recorded as applied, kind C(baseline), without running anything).
    type: str
  accept_version:
    description:
      - With O(action=accept_checksum), the applied version whose edited (or renamed) file is accepted.
    type: str
  revert_to:
    description:
      - With O(action=revert), the version to go back to, or C(base) to revert every migration.
    type: str
  limit:
    description:
      - The C(-l) of the playbook run, used to write the next command to run in failure messages.
    type: str
  fail_on_drift:
    description:
      - With O(action=status), fail when drift (or an out-of-order file) is found.
    type: bool
    default: false
  lock_policy:
    description:
      - Check mode of O(action=apply) - C(refuse) fails the rehearsal when its impact profile shows a lock impact
        (a lock above SHARE UPDATE EXCLUSIVE held while working on, or a rewrite of, a pre-existing table above
        O(lock_rows_threshold) estimated rows) not declared with C(-- ledger:allow-lock schema.table); C(warn)
        reports it. The precheck enforces the same policy before a real run.
    type: str
    choices: [refuse, warn]
    default: warn
  lock_rows_threshold: {description: Tables with more estimated rows than this are large., type: int, default: 100000}
  not_rehearsed:
    description:
      - Check mode - statements (C(file), C(line), C(reason)) never to rehearse on this target, with the rest of
        their file and the later files; the precheck's C(impact.not_rehearsed) (staging measured them as heavy).
    type: list
    elements: dict
    default: []
  record_rehearsal:
    description:
      - With O(action=apply), rehearse the pending migrations first (rolled back) and append a
        C(rehearse) event; a rehearsal that fails stops the run before any change. Check mode never writes.
    type: bool
    default: false
requirements:
  - psycopg2
  - PostgreSQL 14 or later (C(client_connection_check_interval)); tested with 15
attributes:
  check_mode:
    support: full
    description: A rehearsal in a rolled-back transaction; nothing is written.
notes:
  - Sequences advanced by a rehearsal stay advanced (PostgreSQL never rolls back C(nextval)).
  - The lease and the history live in schema C(migrations), created on the first real run.
  - The migrate role's README (roles/migrate/README.md) describes every behaviour, the header directive,
    the baseline and accept-checksum commands, and shows real output.
"""

EXAMPLES = r"""
- name: Apply the pending migrations (a rehearsal under --check)
  ledger_migrate:
    database_url: "{{ database_url }}"
    migrations_dir: "{{ playbook_dir }}/../files/migrations"
    target: "0010"
    run_id: "{{ ledger_run_id }}"
    limit: "{{ ansible_limit }}"
  register: migrate_result

- name: Report applied, pending and drifted migrations
  ledger_migrate:
    database_url: "{{ database_url }}"
    migrations_dir: files/migrations
    action: status
  register: status_result

- name: Record a database migrated by hand as being at 0011
  ledger_migrate:
    database_url: "{{ database_url }}"
    migrations_dir: files/migrations
    action: baseline
    baseline_version: "0011"

- name: Accept an intended edit of the applied 0009
  ledger_migrate:
    database_url: "{{ database_url }}"
    migrations_dir: files/migrations
    action: accept_checksum
    accept_version: "0009"

- name: Revert everything above 0009, newest first
  ledger_migrate:
    database_url: "{{ database_url }}"
    migrations_dir: files/migrations
    action: revert
    revert_to: "0009"
"""

RETURN = r"""
msg:
  description:
    - What happened, in one or a few lines.
    - A failure message names the target, file, line, SQLSTATE and the next command.
  returned: always
  type: str
  sample: applied 0010_webhook_events_crypto_payments.sql to postgres@127.0.0.1:55432/ledger in 21 ms (now at 0010)
target:
  description: The target database, C(user@host:port/db) (never the password).
  returned: always
  type: str
run_id:
  description: The run id written to the events and history rows.
  returned: when action is not status
  type: str
applied:
  description:
    - With C(apply), the migrations this run applied, in order (version, name, filename, execution_ms, attempts,
      transactional). With C(status), the rows of C(migrations.history).
    - After a failure, the versions this run applied before it.
  returned: always
  type: list
  elements: raw
pending:
  description: Versions still to apply (in check mode, the ones the rehearsal ran; with status, the pending files).
  returned: always
  type: list
  elements: raw
above_target:
  description:
    - Versions of the set not applied because they are above the target.
    - Not called C(skipped), because a non-empty C(skipped) key makes Ansible show the task as skipped.
  returned: with action apply
  type: list
  elements: str
rehearsal:
  description:
    - Per file in order, C(status) C(would_apply), C(would_fail) (with sqlstate, message, hint, file, line) or
      C(not_rehearsed); C(skipped_statements) lists statements that can't run in a transaction.
  returned: in check mode (apply, revert) and with record_rehearsal
  type: list
  elements: dict
impact:
  description:
    - The rehearsal's impact profile (module_utils/ledger_impact.py) - C(files) per file and statement (locks
      newly held on pre-existing relations, rewrites, rows, ms), C(impacts), C(policy), C(rows_threshold),
      C(squawk) (where squawk's verdict and the profile disagree).
  returned: in check mode of action apply, when the rehearsal passed
  type: dict
impact_lines:
  description: The policy's verdict and the per-file impact table as lines, when there is an impact or a squawk note.
  returned: in check mode of action apply, when there is an impact or a squawk note
  type: list
  elements: str
drift:
  description: Applied migrations whose file was edited, deleted or renamed (version, kind, both checksums, message).
  returned: always
  type: list
  elements: dict
version_before:
  description: Newest applied version before the run.
  returned: with apply and revert
  type: str
version_after:
  description: Newest applied version after the run (or that it would be, in check mode).
  returned: with apply and revert
  type: str
lines:
  description: Human-readable status lines.
  returned: with action status
  type: list
  elements: str
sqlstate:
  description: PostgreSQL SQLSTATE of the failure.
  returned: on failure
  type: str
  sample: "22012"
file:
  description: File of the failed migration.
  returned: on failure
  type: str
line:
  description: Line in that file, computed from the error position (else the failing statement's first line).
  returned: on failure
  type: int
message:
  description: PostgreSQL's message.
  returned: on failure
  type: str
hint:
  description: PostgreSQL's hint, if any.
  returned: on failure
  type: str
next_command:
  description:
    - The next command to run (fix and re-run, rollback, cleanup SQL or waiting for another run).
    - With C(status), the accept_checksum command for the first drifted version.
  returned: on failure, and with status when a file drifted
  type: str
invalid_indexes:
  description: INVALID indexes a failed non-transactional migration left, each with its cleanup SQL.
  returned: on failure of a non-transactional migration
  type: list
  elements: dict
"""

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact_policy
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module, with_defaults
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import RUN_OPTIONS_SPEC
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, describe_target
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_engine import (
    accept_checksum,
    apply,
    baseline,
    format_rehearsal,
    inspect,
    load_migration_set,
    nontx_route_problem,
    plan_problems,
    rehearse,
    revert,
    status,
)


def _timeouts(p):
    """The settings a rehearsal takes (it holds no lease and opens no direct connection)."""
    return {
        "lock_timeout": p["lock_timeout"],
        "statement_timeout": p["statement_timeout"],
        "lock_retries": p["lock_retries"],
        "retry_backoff": p["lock_retry_backoff"],
    }


def _settings(p):
    """The settings of a real run: the rehearsal's, the lease and the direct URL."""
    return dict(_timeouts(p), lock_wait=p.get("lock_wait"), lock_ttl=p["lock_ttl"],
                direct_url=p.get("direct_url") or None)


def _rehearsal(url, migrations, p, record):
    """Check mode (or record_rehearsal) of action=apply: the pending migrations in a rolled-back transaction."""
    info = inspect(url, migrations, p["target"], p["allow_out_of_order"], advice=PlaybookAdvice(p["limit"]))
    target = describe_target(url)
    problems = plan_problems(info)
    common = {"target": target, "drift": info["drift"], "above_target": info["above_target"],
              "version_before": info["current"], "applied": []}
    if problems:
        raise LedgerError("refusing to apply on %s before any change:\n  - %s" % (target, "\n  - ".join(problems)),
                          **common)
    pending = info["pending"]
    if not pending:
        return dict(common, changed=False, pending=[], rehearsal=[], version_after=info["current"],
                    msg="%s is at %s: nothing to apply (target %s)" % (target, info["current"] or "no version",
                                                                       info["target"]))
    route_problem = nontx_route_problem(url, pending, direct_url=p.get("direct_url"),
                                        advice=PlaybookAdvice(p["limit"]))
    stop_before = dict(((str(x.get("file")), int(x.get("line") or 0)), str(x.get("reason") or "heavy"))
                       for x in p.get("not_rehearsed") or [])
    results = rehearse(url, pending, run_id=p["run_id"], record_event=record, stop_before=stop_before,
                       **_timeouts(p))
    lines = format_rehearsal(results)
    failed = [r for r in results if r["status"] == "would_fail"]
    out = dict(common, changed=True, pending=[m.version for m in pending], rehearsal=results,
               version_after=pending[-1].version)
    if failed:
        f = failed[0]
        nxt = "fix %s line %s, then rehearse again: %s --check" % (
            f["filename"], f["line"], PlaybookAdvice(p["limit"]).migrate())
        msg = ("rehearsal on %s: %s would fail at line %s: SQLSTATE %s: %s%s\n  %s\n  nothing was changed (the"
               " rehearsal was rolled back)\n  next: %s" % (
                   target, f["filename"], f["line"], f["sqlstate"], f["message"],
                   "\n  hint: %s" % f["hint"] if f.get("hint") else "", "\n  ".join(lines), nxt))
        fields = dict((k, v) for k, v in out.items() if k != "version_after")
        raise LedgerError(msg, **dict(fields, file=f["filename"], line=f["line"], sqlstate=f["sqlstate"],
                                      message=f["message"], hint=f.get("hint"), next_command=nxt))
    if route_problem:
        # Every file would apply, but the real run would refuse its no-transaction files: say so now.
        raise LedgerError("rehearsal on %s: every file would apply, but the real run would refuse: %s\n  %s"
                          % (target, route_problem.msg, "\n  ".join(lines)),
                          **dict(out, next_command=route_problem.fields.get("next_command")))
    found = ledger_impact_policy.impacts(results, p["lock_rows_threshold"])
    passed, verdict, nxt = ledger_impact_policy.policy_verdict(found, p["lock_policy"], p["lock_rows_threshold"])
    squawk = ledger_impact_policy.compare_squawk(results, pending, p["lock_rows_threshold"])
    table = ledger_impact_policy.format_table(results) + [
        "squawk: %s" % (("%s line %s: %s" % (n["file"], n["line"], n["note"])) if n.get("file") else n["note"])
        for n in squawk]
    out["impact"] = {"files": ledger_impact_policy.stamp_profile(results), "impacts": found, "policy": p["lock_policy"],
                     "rows_threshold": p["lock_rows_threshold"], "squawk": squawk}
    if found or squawk:  # the operator's screen shows these at verbosity 0 (the precheck's are not shown under --check)
        out["impact_lines"] = ["lock impact: %s" % verdict] + table
    if not passed:
        raise LedgerError("rehearsal on %s: %s\n%s\n  nothing was changed (the rehearsal was rolled back)\n  next: %s"
                          % (target, verdict, "\n".join(table), nxt),
                          **dict(out, file=found[0]["file"], line=found[0]["line"], next_command=nxt))
    out["msg"] = "rehearsal on %s (rolled back, nothing written):\n  %s\nlock impact: %s\n%s" % (
        target, "\n  ".join(lines), verdict, "\n".join(table))
    return out


def failure_changed(action, check_mode, fields):
    """Whether a failed call changed the target: a failed apply or revert may have done part of its work."""
    if check_mode:
        return False
    if action == "apply":
        return bool(fields.get("applied")) or bool(fields.get("statements_applied"))
    if action == "revert":
        return bool(fields.get("reverted"))
    return False


def _failure_changed(result, params, check_mode):
    """module_result's on_failure: a failed call says whether it changed the target."""
    return dict(result, changed=failure_changed(params["action"], check_mode, result))


def run(p, check_mode=False):
    p = with_defaults(ARGUMENT_SPEC, p)  # callers in process may pass only some options
    url = p["database_url"]
    action = p["action"]
    migrations = load_migration_set(p["migrations_dir"])
    common = {"run_id": p["run_id"] or None, "advice": PlaybookAdvice(p["limit"])}
    if action == "status":
        st = status(url, migrations, p["target"], p["allow_out_of_order"], advice=common["advice"])
        result = {"changed": False, "target": st["target_name"], "applied": st["applied"],
                  "pending": st["pending"], "drift": st["drift"], "out_of_order": st["out_of_order"],
                  "current": st["current"], "target_version": st["target"], "above_target": st["above_target"],
                  "lease": st["lease"], "lines": st["lines"], "records": st["records"],
                  "msg": "\n".join(st["lines"])}
        if st["drift"]:
            result["next_command"] = common["advice"].accept_checksum(st["drift"][0]["version"])
        if p["fail_on_drift"] and (st["drift"] or st["out_of_order"]):
            fields = dict((k, v) for k, v in result.items() if k != "msg")
            raise LedgerError("drift on %s:\n%s\n  next: restore the applied file(s) as they were, or accept an"
                              " intended edit with `%s` (roles/migrate/README.md)"
                              % (st["target_name"], "\n".join(st["lines"]),
                                 common["advice"].accept_checksum("VERSION")), **fields)
        return result
    if action == "apply":
        if check_mode:
            return _rehearsal(url, migrations, p, record=False)
        rehearsal = None
        if p["record_rehearsal"]:
            rehearsal = _rehearsal(url, migrations, p, record=True)["rehearsal"]
        result = apply(url, migrations, target=p["target"], allow_out_of_order=p["allow_out_of_order"],
                       **dict(common, **_settings(p)))
        result["applied_versions"] = [a["version"] for a in result["applied"]]
        if rehearsal is not None:
            result["rehearsal"] = rehearsal
        return result
    if action == "revert":
        result = revert(url, migrations, p["revert_to"], check=check_mode, **dict(common, **_settings(p)))
        return result
    if action == "baseline":
        return baseline(url, migrations, p["baseline_version"], check=check_mode,
                        lock_wait=p.get("lock_wait"), lock_ttl=p["lock_ttl"], **common)
    if action == "accept_checksum":
        return accept_checksum(url, migrations, p["accept_version"], check=check_mode,
                               lock_wait=p.get("lock_wait"), lock_ttl=p["lock_ttl"], **common)
    raise LedgerError("unknown action %s" % action)  # pragma: no cover - choices prevent it


ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    migrations_dir=dict(type="path", required=True),
    action=dict(type="str", default="apply",
                choices=["apply", "status", "baseline", "accept_checksum", "revert"]),
    target=dict(type="str"),
    run_id=dict(type="str"),
    run_options=RUN_OPTIONS_SPEC,
    lock_timeout=dict(type="str", default="2s"),
    statement_timeout=dict(type="str", default="0"),
    lock_retries=dict(type="int", default=3),
    lock_retry_backoff=dict(type="float", default=0.5),
    lock_wait=dict(type="float"),
    lock_ttl=dict(type="float", default=60.0),
    direct_url=dict(type="str", no_log=True),
    allow_out_of_order=dict(type="bool", default=False),
    baseline_version=dict(type="str"),
    accept_version=dict(type="str"),
    revert_to=dict(type="str"),
    limit=dict(type="str"),
    fail_on_drift=dict(type="bool", default=False),
    record_rehearsal=dict(type="bool", default=False),
    lock_policy=dict(type="str", choices=["refuse", "warn"], default="warn"),
    lock_rows_threshold=dict(type="int", default=100000),
    not_rehearsed=dict(type="list", elements="dict", default=[]),
)

SPEC_OPTIONS = dict(
    required_if=[
        ("action", "baseline", ["baseline_version"]),
        ("action", "accept_checksum", ["accept_version"]),
        ("action", "revert", ["revert_to"]),
    ],
)


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_migrate.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    return module_result("ledger_migrate", run, params, check_mode, on_failure=_failure_changed)


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
