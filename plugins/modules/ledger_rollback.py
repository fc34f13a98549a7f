#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
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
  mode: {description: "revert (down scripts), restore (a backup), or cleanup (what restores left: see
    O(drop_leftovers), O(drop_kept) and O(allow_connections))", type: str, choices: [revert, restore, cleanup], default: revert}
  step: {description: "plan: read-only checks (revert only); run: do it (or rehearse it in check mode).", type: str, choices: [plan, run], default: run}
  migrations_dir: {description: The migration set (NNNN_name.sql and NNNN_name.down.sql)., type: path}
  rollback_to: {description: "Revert the applied migrations above this version; C(base) reverts all.", type: str}
  versions: {description: "Revert exactly these versions (the migrations a failed run applied: version strings, or the
    engine's applied entries with a C(version) key); they must be the newest applied.", type: list, elements: raw}
  allow_data_loss: {description: Revert even when the dropped tables or columns hold rows (a verified backup is required first)., type: bool, default: false}
  data_loss_backup: {description: "The verified backup taken before a revert that loses rows (the backup role's backup_file).", type: path}
  backup_dir: {description: Where the backups and their manifests are (restore)., type: path}
  backup_file: {description: "Restore this backup instead of the newest verified one (its manifest must be beside it); for a
    revert plan refused for a missing down script, the backup its next command restores.", type: path}
  backup_other_target: {description: "Restore O(backup_file) even when its manifest is of another target (another server's
    system_identifier or another database name).", type: bool, default: false}
  terminate_connections:
    description: Terminate the sessions connected to the target so that the restored database can be swapped in.
    type: bool
    default: false
  drop_leftovers: {description: "cleanup - drop the target's C(<db>_restore_*) scratch copies of interrupted restores
    (each with its size and age in the result), under the target's run lease (it waits for a restore in progress within
    O(lock_wait), or refuses naming it). The C(<db>_pre_restore_*) databases kept by restores are listed, not dropped
    (see O(drop_kept)).", type: bool, default: false}
  drop_kept: {description: "cleanup - drop the target's C(<db>_pre_restore_*) databases kept by restores, under the run
    lease as O(drop_leftovers) (alone, or with it). Each holds the rows written to the target after the backup its
    restore used, which no other database holds: dropping it loses them.", type: bool, default: false}
  allow_connections: {description: "cleanup - set ALLOW_CONNECTIONS true on the target when it refuses connections
    (datallowconn false, left by an interrupted restore of an older version).", type: bool, default: false}
  maintenance_db: {description: Database to connect to for CREATE/ALTER DATABASE during a restore., type: str, default: postgres}
  restore_jobs: {description: Parallel pg_restore jobs into the new database., type: int, default: 1}
  restore_space_margin: {description: "Free space the copy needs, as a multiple of the database's size (refused below it
    when the free space is measurable: the server on this machine and data_directory readable).", type: float, default: 1.2}
  swap_timeout: {description: Seconds to wait for terminated sessions to go before the swap gives up., type: int, default: 15}
  pg_bindir: {description: Directory of pg_restore (default the server's major version's)., type: path}
  lock_timeout: {description: lock_timeout of each down script (and of the rehearsal)., type: str, default: 2s}
  statement_timeout: {description: statement_timeout of each down script (0 for none)., type: str, default: "0"}
  lock_retries: {description: Retries of a down script after a lock timeout (exponential back-off with jitter)., type: int, default: 3}
  retry_backoff: {description: "First back-off in seconds before a retry (doubled each time, with jitter).", type: float}
  lock_wait: {description: Seconds to wait for another run's lease before failing., type: float}
  lock_ttl: {description: Seconds a lease lives without renewal (a killed run's lease expires after it)., type: float}
  direct_url:
    description: A URL of the same database that bypasses PgBouncer, used only for no-transaction down scripts.
    type: str
  run_id: {description: The run id recorded in the events., type: str}
  run_options: {description: The ansible-playbook options (-i -l -e vault) every next command carries; set by the action plugin., type: list, elements: str}
  host_label: {description: How the operator names this target with -l (used in the next commands)., type: str}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
author: Arrakis platform team (@arrakis-platform)
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
backup_needed: {description: "Rows would be lost and the loss is allowed: a verified backup must be taken first.", type: bool, returned: revert}
rehearsal: {description: "The rehearsal of the down scripts: per version {version, ok, dropped_tables, dropped_columns}.", type: list, returned: revert}
backup_file: {description: The backup restored (or that would be)., type: str, returned: restore}
restored_database: {description: Name of the database after the swap (the target's name)., type: str, returned: restore}
previous_database: {description: Name under which the database as it was before the restore is kept., type: str, returned: restore}
drop_previous: {description: "psql command dropping the kept database (host, port, user, database names; no URL).", type: str, returned: restore}
space:
  description: "Room for the copy: {needed_bytes, margin, free_bytes (null when not measurable), path, why, previous_copies}."
  type: dict
  returned: restore
guarded: {description: Versions whose revert transaction locked and re-counted what they drop., type: list, returned: revert run}
blocking_sessions: {description: Sessions connected to the target (they block the swap)., type: list, returned: restore}
leftovers: {description: "The target's databases left by restores, oldest first: {name, kind (scratch or kept), size_bytes,
  age_s, allows_connections}.", type: list, returned: cleanup}
dropped: {description: "Those dropped (in check mode: that would be), each only once DROP DATABASE returned.", type: list,
  returned: cleanup}
left: {description: "Those not asked to drop (a kept one without O(drop_kept), a scratch copy without O(drop_leftovers));
  the message gives the command that drops them.", type: list, returned: cleanup}
in_use: {description: "Those kept because tagged with the run lease's holder (a restore that may still run), with its
  run_id and holder.", type: list, returned: cleanup}
not_dropped: {description: "Those whose DROP DATABASE failed, with its error and the psql command that drops it.", type: list,
  returned: cleanup}
connections_allowed: {description: "True when connections were allowed again, false when the target refuses them and
  O(allow_connections) was not given, null when it accepts them.", type: bool, returned: cleanup}
"""


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rollback_plan import (
    ARGUMENT_SPEC,
    _defaults,
    plan_revert,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_leftovers import run_cleanup
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rollback_restore import (
    run_restore,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rollback_revert import (
    run_revert,
)


def run(params, check_mode=False):
    p = _defaults(params)
    if p["mode"] == "cleanup":
        return run_cleanup(p, check_mode)
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
    return module_result("ledger_rollback", run, params, check_mode)


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
