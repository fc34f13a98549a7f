#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""backup_method=pgbackrest: the precheck's checks, the backup stage's restore point, the PITR rollback."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_pgbackrest
short_description: pgBackRest as the pipeline's safety net (check, restore point, point-in-time recovery)
description:
  - Runs on the database server (the roles delegate it to C(pgbackrest_host)), as root or as the
    cluster's OS user; pgbackrest, pg_ctl and psql run as O(os_user) (through C(runuser) when root).
  - "O(action=check): the precheck's refusals: C(archive_mode) on, no C(pg_stat_archiver) failure since
    the last success, C(pgbackrest check) passes for the stanza, and the newest full or diff backup
    is younger than O(max_age). Each refusal says what to run."
  - "O(action=check) also lists what point-in-time recoveries left beside the data directory
    (C(<data>.pitr_<stamp>): a copy of an interrupted recovery, C(<data>.pitr_<stamp>.failed): a copy that did not
    start, C(<data>.pre_pitr_<stamp>): the cluster as it was before a finished one) with size (measured for at most
    O(leftovers_size_timeout) seconds), age, whether the recovery running now (its PITR lock) uses it, and the
    command that removes it; never removes anything. A warning, except when copies no recovery uses leave less
    free space than the next recovery's copy needs (its databases + its WAL + an allowance for the rest of a data
    directory, x O(space_margin)): then it refuses."
  - "O(action=backup): takes a backup of O(backup_type) (C(none) takes none), creates the restore
    point C(ledger-<run_id>) with exact row counts at that point (the tables are locked in SHARE mode
    for milliseconds, bounded by O(lock_timeout)), switches the WAL, waits until the restore point's
    segment is archived and in the repository, writes a manifest C(<slug>_<version>_<stamp>.pitr.json)
    in O(backup_dir) and a C(backup) event."
  - "O(action=restore): point-in-time recovery of the cluster to a manifest's restore point: takes the
    cluster's PITR lock and the target's run lease (as migrate and the dump restore do; see
    module_utils/ledger_pgbackrest_lease.py), counts what would be lost, refuses without O(allow_data_loss), restores into a new data directory, starts
    it on a spare port, checks history and row counts against the manifest, then stops the target,
    swaps the directories and starts it; any failure leaves (or puts back) the target as it was."
options:
  action: {description: What to do., type: str, choices: [check, backup, restore], required: true}
  database_url: {description: libpq URI of the target database., type: str, required: true}
  stanza: {description: The pgBackRest stanza of the target's cluster., type: str, required: true}
  config: {description: pgbackrest.conf on this host (empty for pgBackRest's default)., type: path}
  os_user: {description: The cluster's OS user (owner of the data directory)., type: str, default: postgres}
  binary: {description: The pgbackrest binary on this host (a name on PATH or a path)., type: str, default: pgbackrest}
  block_incremental:
    description:
      - "backup: block incremental (C(--repo1-bundle --repo1-block): an incr stores only the changed blocks of a
        changed file). C(auto): on when the binary is pgBackRest >= 2.46; C(true): required (refused below 2.46);
        C(false): not on the command line (pgbackrest.conf decides)."
    type: str
    default: auto
  max_age: {description: "check: the newest full/diff backup may be at most this old (7d, 36h, 3600).", type: str, default: 7d}
  check_timeout: {description: Seconds for C(pgbackrest check)., type: int, default: 120}
  backup_type: {description: "backup: what to take before the restore point.", type: str, choices: [none, incr, diff, full], default: incr}
  backup_dir: {description: Where the manifests are (created 0700)., type: path}
  backup_file: {description: "restore: this manifest instead of the newest of the target.", type: path}
  row_counts: {description: "backup: exact row counts at the restore point, checked by a restore.", type: bool, default: true}
  lock_timeout: {description: "backup: bound on the SHARE locks taken for the exact counts.", type: str, default: 10s}
  archive_timeout: {description: "backup: seconds to wait for the restore point's segment in the archive.", type: int, default: 120}
  allow_data_loss: {description: "restore: consent to lose everything committed after the restore point.", type: bool, default: false}
  recovery_timeout: {description: "restore: seconds for the recovery to reach the restore point.", type: int, default: 3600}
  space_margin:
    description: "restore (and check's leftovers): free space needed beside the data directory, times the recovered
      copy's estimated size (databases + WAL + the rest of a data directory)."
    type: float
    default: 1.2
  leftovers_size_timeout:
    description: "check: seconds measuring the sizes of the recoveries' leftovers may take in all (then: size not measured)."
    type: float
    default: 10
  lock_wait: {description: "restore: seconds to wait for another run's lease (or another PITR of the cluster) before refusing.", type: float, default: 90}
  lock_ttl: {description: "restore: seconds the run lease lives without renewal (a killed run's lease expires after it).", type: float, default: 60}
  connect_timeout: {description: "restore: seconds to wait for a connection.", type: int, default: 10}
  pg_bindir: {description: Directory of pg_ctl and psql (default the server's major version's)., type: path}
  progress_file: {description: Internal (the action plugin's progress lines)., type: path}
  progress_interval: {description: Seconds between progress lines of a long backup or recovery., type: int, default: 10}
  run_id: {description: The run id of the events., type: str, default: adhoc}
  host_label: {description: The target's inventory name in messages., type: str, default: ""}
  rerun_command: {description: What the operator runs after a fix., type: str, default: the same ansible-playbook command}
  run_options: {description: The ansible-playbook options (-i -l -e vault) every next command carries; set by the action plugin., type: list, elements: str}
  playbook_pid: {description: "Internal: the ansible-playbook a restore dies with up to its swap (set by the action plugin).", type: int}
  watch_channel:
    description: "Internal: on a remote host, a restore dies up to its swap when its SSH channel hangs up (set by the action plugin)."
    type: bool
    default: false
author: Arrakis platform team (@arrakis-platform)
"""

EXAMPLES = r"""
- name: Take the restore point of this run
  ledger_pgbackrest:
    action: backup
    database_url: "{{ database_url }}"
    stanza: main
    backup_type: none
    backup_dir: /var/backups/ledger
    run_id: "{{ ledger_run_id }}"
"""

RETURN = r"""
checks: {description: "check: each check with name, ok, observed, message.", returned: always, type: list}
backup_file: {description: "backup: the manifest's path (what a restore takes as backup_file).", returned: success, type: str}
restore_point: {description: "backup/restore: the restore point's name.", returned: success, type: str}
lsn: {description: "backup: the restore point's LSN.", returned: success, type: str}
data_at_risk: {description: "restore: what the recovery discards (WAL bytes, transactions, events, versions).", returned: restore, type: dict}
previous_data_directory: {description: "restore: where the data directory as it was is kept.", returned: success, type: str}
pitr_leftovers:
  description: "check: directories left by point-in-time recoveries beside the data directory: path, kind (interrupted,
    failed, kept), stamp, age_s, size_bytes (null when not measured), size_note, in_use, sockets, advice, remove_command."
  returned: check
  type: list
  elements: dict
"""

import datetime
import json
import os
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_dir import ensure_backup_dir
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import RUN_OPTIONS_SPEC
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    backup_basename,
    count_rows,
    server_identity,
    target_slug,
    utc_iso,
    utc_stamp,
    write_manifest,
    COUNTABLE_TABLES_SQL,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    connect,
    describe_target,
    ensure_records,
    log_event,
    log_event_autonomous,
    redact,
    redact_obj,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest import (
    MANIFEST_KIND,
    PgBackRest,
    archive_id,
    archiver_state,
    human_age,
    iso,
    newest_backup,
    parse_age,
    restore_point_name,
    wait_archived,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import copy_estimate, leftovers_check
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_pitr import run_restore

ARGUMENT_SPEC = dict(
    action=dict(type="str", required=True, choices=["check", "backup", "restore"]),
    database_url=dict(type="str", required=True, no_log=True),
    stanza=dict(type="str", required=True),
    config=dict(type="path"),
    os_user=dict(type="str", default="postgres"),
    binary=dict(type="str", default="pgbackrest"),
    block_incremental=dict(type="str", default="auto"),
    max_age=dict(type="str", default="7d"),
    check_timeout=dict(type="int", default=120),
    backup_type=dict(type="str", default="incr", choices=["none", "incr", "diff", "full"]),
    backup_dir=dict(type="path"),
    backup_file=dict(type="path"),
    row_counts=dict(type="bool", default=True),
    lock_timeout=dict(type="str", default="10s"),
    archive_timeout=dict(type="int", default=120),
    allow_data_loss=dict(type="bool", default=False),
    recovery_timeout=dict(type="int", default=3600),
    space_margin=dict(type="float", default=1.2),
    leftovers_size_timeout=dict(type="float", default=10.0),
    lock_wait=dict(type="float", default=90.0),
    lock_ttl=dict(type="float", default=60.0),
    connect_timeout=dict(type="int", default=10),
    pg_bindir=dict(type="path"),
    progress_file=dict(type="path"),
    progress_interval=dict(type="int", default=10),
    run_id=dict(type="str", default="adhoc"),
    host_label=dict(type="str", default=""),
    rerun_command=dict(type="str", default="the same ansible-playbook command"),
    run_options=RUN_OPTIONS_SPEC,
    playbook_pid=dict(type="int"),
    watch_channel=dict(type="bool", default=False),
)
SPEC_OPTIONS = {}


def progress_writer(path):
    """progress(phase, percent=None): the action plugin prints it every progress_interval seconds."""
    started = time.time()

    def write(phase, percent=None):
        if not path:
            return
        tmp = path + ".tmp"
        try:  # best effort: a progress line is never worth a failure
            with open(tmp, "w") as fh:
                json.dump({"phase": phase, "percent": percent, "elapsed": time.time() - started}, fh)
            os.replace(tmp, path)
        except OSError:
            pass
    return write


# --------------------------------------------------------------------------- check

def _check(name, ok, observed, message, next_step=None):
    return {"name": name, "ok": bool(ok), "observed": observed, "message": message, "next": next_step}


def _data_directory(cur):
    """{data_directory, copy_estimate} of the target's server, or {data_directory: None, error}: reading it needs
    superuser or pg_read_all_settings (and the sizes CONNECT on every database), which the PITR needs anyway."""
    import psycopg2
    try:
        cur.execute("SELECT current_setting('data_directory')")
        data_directory = cur.fetchone()[0]
        estimate = copy_estimate(cur)
    except psycopg2.Error as exc:  # autocommit: nothing to roll back
        return {"data_directory": None, "error": "cannot read the data directory and the cluster's size as this role "
                "(%s): the leftovers of point-in-time recoveries were not listed" % redact(str(exc)).strip()}
    return {"data_directory": data_directory.rstrip("/"), "copy_estimate": estimate}


def run_check(p, repo, target):
    checks = []
    conn = connect(p["database_url"])
    try:
        with conn.cursor() as cur:
            state = archiver_state(cur)
            where = _data_directory(cur)
    finally:
        conn.close()
    push = repo.command_line("archive-push", "%p").replace("sudo -u %s " % repo.user.name, "")
    checks.append(_check(
        "archive_mode", state["archive_mode"] in ("on", "always"), state["archive_mode"],
        "archive_mode is %s" % state["archive_mode"],
        None if state["archive_mode"] in ("on", "always") else
        "set archive_mode = on and archive_command = '%s' in postgresql.conf, restart PostgreSQL, then run: %s"
        % (push, repo.command_line("check"))))
    failing = bool(state["failing"])
    checks.append(_check(
        "archiver", not failing,
        {k: state[k] for k in ("archived_count", "last_archived_wal", "last_archived_time", "failed_count",
                               "last_failed_wal", "last_failed_time")},
        ("archiving fails: %s failed at %s, after the last success (%s at %s)"
         % (state["last_failed_wal"], state["last_failed_time"], state["last_archived_wal"],
            state["last_archived_time"])) if failing else
        "no archive failure since the last success (%s)" % (state["last_archived_wal"] or "none yet"),
        ("fix archive_command (the server log says why %s failed), then run: %s"
         % (state["last_failed_wal"], repo.command_line("check"))) if failing else None))
    ok, output = repo.check(timeout=p["check_timeout"])
    checks.append(_check(
        "pgbackrest_check", ok, output or "ok",
        "pgbackrest check passed for stanza %s" % repo.stanza if ok else
        "pgbackrest check failed for stanza %s: %s" % (repo.stanza, output),
        None if ok else "fix what it says, then run: %s" % repo.command_line("check")))
    max_age = parse_age(p["max_age"])
    try:
        info = repo.info()
        newest = newest_backup(info, ("full", "diff"))
    except LedgerError as exc:
        newest, info_error = None, exc.msg
    else:
        info_error = None
    if newest:
        age = time.time() - newest["timestamp"]["stop"]
        young = age <= max_age
        checks.append(_check(
            "backup_age", young, {"label": newest["label"], "type": newest["type"], "stopped_at":
                                  iso(newest["timestamp"]["stop"]), "age_s": int(age), "max_age": p["max_age"]},
            "newest full/diff backup %s is %s old (at most %s)" % (newest["label"], human_age(age), p["max_age"]),
            None if young else "take a fresh one: %s" % repo.command_line("--type=diff", "backup")))
    else:
        checks.append(_check(
            "backup_age", False, {"error": info_error} if info_error else "no full or diff backup",
            "no full or diff backup in stanza %s%s" % (repo.stanza, (": " + info_error) if info_error else ""),
            "take one: %s" % repo.command_line("--type=full", "backup")))
    leftovers = []  # what point-in-time recoveries left beside the data directory
    if where["data_directory"] is None:
        checks.append(_check("pitr_leftovers", True, None, "not checked: %s" % where["error"]))
    else:
        check, leftovers = leftovers_check(where["data_directory"], where["copy_estimate"], p["space_margin"],
                                           p["leftovers_size_timeout"])
        checks.append(check)
    try:
        block = "on" if repo.block_options() else "off (pgbackrest.conf decides)" if repo.block_incremental in (
            "false", "no", "off", "0") else "off (needs pgBackRest >= 2.46)"
        version = "%d.%d" % repo.version()
    except LedgerError as exc:
        checks.append(_check("block_incremental", False, repo.block_incremental, exc.msg,
                             "install pgBackRest >= 2.46 on the database host, or set pgbackrest_block_incremental=auto"))
        block, version = "refused", "%d.%d" % repo.version() if repo._version else "(unknown)"
    failed = [c for c in checks if not c["ok"]]
    lines = ["pgBackRest %s on %s (stanza %s, block incremental %s): %d checks, %d failed"
             % (version, target, repo.stanza, block, len(checks), len(failed))]
    for c in checks:
        lines.append("  %s %s: %s" % ("ok    " if c["ok"] else "FAILED", c["name"], c["message"]))
        if c["next"]:
            lines.append("         next: %s" % c["next"])
    if failed:
        lines.append("nothing was changed; after the fix re-run: %s" % p["rerun_command"])
    result = {"changed": False, "checks": checks, "failed_checks": [c["name"] for c in failed], "msg": "\n".join(lines),
              "pgbackrest_version": version, "block_incremental": block, "pitr_leftovers": leftovers}
    if failed:
        result["failed"] = True
    return result


# --------------------------------------------------------------------------- backup

def _facts(cur):
    cur.execute("SELECT current_setting('server_version'), current_database(),"
                " to_regclass('migrations.history') IS NOT NULL, pg_is_in_recovery()")
    version, dbname, has_records, in_recovery = cur.fetchone()
    return {"server_version": version, "database": dbname, "has_records": has_records, "in_recovery": in_recovery,
            "identity": server_identity(cur)}


def _qualified(rows):
    from psycopg2 import sql
    return [sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t)) for s, t in rows]


def create_restore_point(url, name, lock_timeout, row_counts):
    """The restore point, with the history (and exact row counts) of that very point.

    Session A locks every user table in SHARE mode (no write can commit meanwhile), exports
    its snapshot, and creates the restore point; session B imports the snapshot before A
    commits, so B sees exactly what a recovery to the restore point will contain, and counts
    at leisure after the locks are gone (milliseconds).
    """
    from psycopg2 import sql
    a = connect(url, autocommit=False)
    b = connect(url, autocommit=False)
    try:
        with a.cursor() as ca, b.cursor() as cb:
            ca.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
            if row_counts:
                ca.execute(COUNTABLE_TABLES_SQL)
                tables = _qualified(ca.fetchall())
                if tables:
                    try:
                        ca.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.SQL(", ").join(tables)))
                    except Exception as exc:  # psycopg2.errors.LockNotAvailable and friends
                        raise LedgerError(
                            "could not lock the tables for an exact count at the restore point within "
                            "lock_timeout=%s (%s): a long write transaction is running; retry when it is done, "
                            "or pass -e backup_row_counts=false (a restore then checks the history only)"
                            % (lock_timeout, redact(str(exc)).strip()))
            ca.execute("SELECT pg_export_snapshot()")
            snapshot = ca.fetchone()[0]
            cb.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cb.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
            ca.execute("SELECT lsn::text, pg_walfile_name(lsn), pg_snapshot_xmax(pg_current_snapshot())::text,"
                       " clock_timestamp() FROM pg_create_restore_point(%s) AS lsn", (name,))
            lsn, walfile, next_xid, at = ca.fetchone()
            a.commit()
            ca.execute("SELECT pg_switch_wal()::text")
            a.commit()
            cb.execute("SELECT to_regclass('migrations.history') IS NOT NULL")
            applied = []
            if cb.fetchone()[0]:
                cb.execute("SELECT version FROM migrations.history ORDER BY version")
                applied = [r[0] for r in cb.fetchall()]
            counts = count_rows(cb) if row_counts else None
            b.commit()
    finally:
        a.close()
        b.close()
    return {"restore_point": name, "restore_point_lsn": lsn, "wal_file": walfile, "timeline": int(walfile[:8], 16),
            "next_xid": next_xid, "restore_point_time": at.isoformat(), "applied": applied, "row_counts": counts}


def run_backup(p, repo, target, check_mode, progress):
    started = time.time()
    url, run_id = p["database_url"], p["run_id"]
    if not p.get("backup_dir"):
        raise LedgerError("backup_method=pgbackrest needs backup_dir (where the restore point's manifest goes)")
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            facts = _facts(cur)
            state = archiver_state(cur)
    finally:
        conn.close()
    if facts["in_recovery"]:
        raise LedgerError("%s is a standby: take the restore point on the primary" % target)
    if state["archive_mode"] not in ("on", "always"):
        raise LedgerError("archive_mode is %s on %s: a restore point needs WAL archiving (see the precheck's "
                          "pgbackrest checks)" % (state["archive_mode"], target))
    name = restore_point_name(run_id)
    if check_mode:
        info = repo.info()
        base = newest_backup(info)
        return {"changed": True, "restore_point": name, "backup_type": p["backup_type"],
                "msg": "would take a %s backup of stanza %s, then the restore point %s on %s (newest backup now: %s)"
                       % (p["backup_type"], repo.stanza, name, target, base["label"] if base else "none")}
    fields = {"method": "pgbackrest", "stanza": repo.stanza, "backup_type": p["backup_type"], "restore_point": name}
    try:
        backup_s = 0.0
        block = bool(repo.block_options()) if p["backup_type"] != "none" else None
        fields["block_incremental"] = block
        if p["backup_type"] != "none":
            progress("pgbackrest %s backup" % p["backup_type"], 0.0)
            t0 = time.time()
            repo.backup(p["backup_type"], progress=lambda pct: progress("pgbackrest %s backup" % p["backup_type"], pct))
            backup_s = time.time() - t0
        info = repo.info()
        base = newest_backup(info)
        if base is None:
            raise LedgerError("stanza %s has no backup to recover from: take one with: %s"
                              % (repo.stanza, repo.command_line("--type=full", "backup")))
        arch_id = archive_id(info)
        progress("restore point %s" % name)
        point = create_restore_point(url, name, p["lock_timeout"], p["row_counts"])
        fields.update(restore_point_lsn=point["restore_point_lsn"], wal_file=point["wal_file"])
        progress("waiting for %s in the archive" % point["wal_file"])
        conn = connect(url)
        try:
            with conn.cursor() as cur:
                wait_archived(cur, repo, arch_id, point["wal_file"], p["archive_timeout"], state["failed_count"] or 0)
        finally:
            conn.close()
    except LedgerError as exc:
        msg = ("pgBackRest backup stage failed on %s (stanza %s): %s. Nothing was migrated; after the fix re-run: %s"
               % (target, repo.stanza, exc.msg, p["rerun_command"]))
        log_event_autonomous(url, run_id, "backup", "failed", duration_ms=int((time.time() - started) * 1000),
                             detail=dict(redact_obj(fields), error=redact(exc.msg)))
        raise LedgerError(msg, **dict(exc.fields, **fields))
    slug = target_slug(url)
    applied = point["applied"]
    ensure_backup_dir(p["backup_dir"])
    path = os.path.join(os.path.abspath(p["backup_dir"]), backup_basename(slug, applied[-1] if applied else None, utc_stamp())
                        + ".pitr")
    manifest = {
        "kind": MANIFEST_KIND, "format": 1, "method": "pgbackrest", "stanza": repo.stanza, "config": repo.config,
        "backup_type": p["backup_type"], "block_incremental": block, "pgbackrest_version": "%d.%d" % repo.version(),
        "backup_label": base["label"], "backup_stop": iso(base["timestamp"]["stop"]),
        "archive_id": arch_id, "target": target, "target_slug": slug,
        "system_identifier": facts["identity"]["system_identifier"], "database": facts["database"],
        "server_version": facts["server_version"], "schema_version": applied[-1] if applied else None,
        "verified": True, "verify_method": "restore point segment archived (pg_stat_archiver and repository)",
        "started_at": utc_iso(datetime.datetime.fromtimestamp(started, datetime.timezone.utc)), "backup_duration_s": round(backup_s, 3),
        "run_id": run_id,
    }
    manifest.update(point)
    manifest["row_counts_method"] = "count(*) in the snapshot of the restore point" if p["row_counts"] else None
    manifest["finished_at"] = utc_iso()
    manifest["duration_s"] = round(time.time() - started, 3)
    manifest_file = write_manifest(path, redact_obj(manifest))
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            ensure_records(cur)
            log_event(cur, run_id, "backup", "ok", version=manifest["schema_version"],
                      duration_ms=int(manifest["duration_s"] * 1000),
                      detail={"method": "pgbackrest", "manifest": manifest_file, "stanza": repo.stanza,
                              "backup_type": p["backup_type"], "block_incremental": block,
                              "backup_label": base["label"],
                              "restore_point": name, "lsn": point["restore_point_lsn"], "timeline": point["timeline"]})
    finally:
        conn.close()
    return {
        "changed": True, "backup_file": manifest_file, "manifest": manifest_file, "method": "pgbackrest",
        "restore_point": name, "lsn": point["restore_point_lsn"], "timeline": point["timeline"],
        "wal_file": point["wal_file"], "backup_label": base["label"], "backup_type": p["backup_type"],
        "block_incremental": block,
        "verified": True, "verify_method": manifest["verify_method"], "row_counts": point["row_counts"],
        "schema_version": manifest["schema_version"], "duration_s": manifest["duration_s"],
        "backup_duration_s": manifest["backup_duration_s"], "sha256": None, "size_bytes": None, "removed": [],
        "msg": "restore point %s on %s at %s (timeline %d, segment %s archived), on %s backup %s of stanza %s "
               "in %.1f s; manifest %s"
               % (name, target, point["restore_point_lsn"], point["timeline"], point["wal_file"],
                  base["type"], base["label"], repo.stanza, manifest["duration_s"], manifest_file),
    }


# --------------------------------------------------------------------------- entry points

def _run(params, check_mode):
    target = describe_target(params["database_url"])
    repo = PgBackRest(params["stanza"], params.get("config"), params["os_user"], params["binary"],
                      params["block_incremental"])
    progress = progress_writer(params.get("progress_file"))
    if params["action"] == "check":
        return run_check(params, repo, target)
    if params["action"] == "backup":
        return run_backup(params, repo, target, check_mode, progress)
    return run_restore(params, repo, target, check_mode, progress)


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises."""
    return module_result("ledger_pgbackrest %s" % params["action"], _run, params, check_mode)


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
