#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Runbook step 1: a verified pg_dump of the target, with its manifest."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_backup
short_description: Back up a PostgreSQL database with pg_dump, verify it, and write its manifest
description:
  - Dumps the whole database with C(pg_dump) (custom format, or directory format with parallel jobs)
    from a snapshot exported by a REPEATABLE READ transaction, so that the row counts taken in that
    transaction (O(row_counts), on by default) and the dump agree.
  - "Verifies the dump before reporting success: pg_dump's exit status, the sha256, a full read
    (C(pg_restore -f /dev/null)), and with O(verify=restore) a restore into a scratch database whose
    per-table row counts are compared with the source's."
  - Writes C(<backup>.json) beside the backup (no password in it), with the server's C(system_identifier) and the
    database name (what identifies the target, whatever hostname or port reached it) and the per-table row
    counts, applies O(retention), and records
    a C(backup) event in C(migrations.events) (real runs only).
  - Files are created mode 0600 in a 0700 directory. A failed dump or verification leaves no backup
    file behind and fails the task.
options:
  database_url: {description: libpq URI of the database to back up., type: str, required: true}
  backup_dir: {description: Directory of the backups and manifests (created 0700 when missing)., type: path, required: true}
  format: {description: pg_dump format., type: str, choices: [custom, directory], default: custom}
  jobs: {description: Parallel dump and restore jobs (directory format only for the dump)., type: int, default: 1}
  compress: {description: gzip level 0-9 (on 2 cores compression dominates the dump time)., type: int, default: 1}
  lock_wait_timeout: {description: pg_dump --lock-wait-timeout; the dump fails rather than queue behind an exclusive lock., type: str, default: 10s}
  verify:
    description: "C(read): sha256 and full read; C(restore): also restore into a scratch database and compare row counts."
    type: str
    choices: [read, restore]
    default: read
  row_counts: {description: "Count every table's rows (count(*)) in the dump's snapshot and record them in the manifest, so that a
    restore can check its copy against them (one scan of every table, while pg_dump runs). Always done with O(verify=restore).", type: bool, default: true}
  retention: {description: Keep the newest N backups of this target (0 keeps all); the newest verified one is never deleted., type: int, default: 5}
  space_margin: {description: Free space needed in backup_dir as a multiple of the database size., type: float, default: 1.2}
  pg_bindir: {description: Directory of pg_dump/pg_restore (default the server's major version's)., type: path}
  run_id: {description: The run id recorded in the event and the manifest., type: str}
  run_options: {description: The ansible-playbook options (-i -l -e vault) every next command carries; set by the action plugin., type: list, elements: str}
  progress_file: {description: Internal. JSON progress written every second (read by plugins/action/ledger_backup.py)., type: path}
  progress_interval: {description: Seconds between progress lines (used by plugins/action/ledger_backup.py)., type: float, default: 10}
  rerun_command: {description: What the operator runs after fixing a failure (shown in the message)., type: str}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
author: Arrakis platform team (@arrakis-platform)
"""

EXAMPLES = r"""
- name: Back up the database
  ledger_backup:
    database_url: "{{ database_url }}"
    backup_dir: /var/backups/ledger/staging
    verify: restore
  no_log: false
"""

RETURN = r"""
backup_file: {description: Path of the verified backup., type: str, returned: success}
manifest: {description: Path of its JSON manifest., type: str, returned: success}
sha256: {description: sha256 of the backup., type: str, returned: success}
size_bytes: {description: Size of the backup., type: int, returned: success}
verified: {description: Whether every verification passed., type: bool, returned: always}
verify_method: {description: What was verified., type: str, returned: always}
removed: {description: Backups removed by retention., type: list, returned: success}
"""

import os
import subprocess
import threading
import time
import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import RUN_OPTIONS_SPEC, playbook_command
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, format_pg_error, log_event_autonomous, pg_error, redact,
    redact_obj, url_with_database,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_dir import check_backup_dir, ensure_backup_dir
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    run_tool,
    FORMAT_SUFFIX, MANIFEST_FORMAT, apply_retention, backup_basename, count_rows,
    reserve_backup_path, find_bindir, full_read_check, human_bytes, libpq_env, path_size,
    server_identity, sha256_path, target_slug, tool_major, tool_version, utc_iso, utc_stamp, manifest_path_for,
    stage_manifest, publish_backup,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None


def default_rerun():
    """What the operator runs after fixing a failure, with this run's options (ledger_next)."""
    return "the same ansible-playbook command (to back up alone: `%s`)" % playbook_command("backup")


ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    backup_dir=dict(type="path", required=True),
    format=dict(type="str", choices=["custom", "directory"], default="custom"),
    jobs=dict(type="int", default=1),
    compress=dict(type="int", default=1),
    lock_wait_timeout=dict(type="str", default="10s"),
    verify=dict(type="str", choices=["read", "restore"], default="read"),
    row_counts=dict(type="bool", default=True),
    retention=dict(type="int", default=5),
    space_margin=dict(type="float", default=1.2),
    pg_bindir=dict(type="path"),
    run_id=dict(type="str"),
    run_options=RUN_OPTIONS_SPEC,
    progress_file=dict(type="path"),
    progress_interval=dict(type="float", default=10),
    rerun_command=dict(type="str"),
    connect_timeout=dict(type="int", default=10),
)


class Progress(object):
    """Writes {phase, bytes, db_size, elapsed_s} to progress_file every second (best effort)."""

    def __init__(self, path, db_size, watch):
        self.path = path
        self.db_size = db_size
        self.watch = watch
        self.phase = "starting"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        if self.path:
            self._thread = threading.Thread(target=self._loop, name="ledger-backup-progress", daemon=True)
            self._thread.start()
        return self

    def set(self, phase):
        self.phase = phase
        self.write()

    def write(self):
        if not self.path:
            return
        import json
        data = {"phase": self.phase, "bytes": path_size(self.watch) if self.watch else 0,
                "db_size": self.db_size, "elapsed_s": round(time.time() - self.started, 1)}
        tmp = self.path + ".tmp"
        try:
            # In the shared temporary directory: never through a symlink someone put at that name.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def _loop(self):
        while not self._stop.wait(1.0):
            self.write()

    def stop(self, phase="done"):
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self.set(phase)


def _server_facts(url, connect_timeout):
    conn = connect(url, autocommit=True, connect_timeout=connect_timeout)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
                        " pg_database_size(current_database()), current_database(),"
                        " to_regclass('migrations.history') IS NOT NULL")
            version, version_num, size, dbname, has_records = cur.fetchone()
            identity = server_identity(cur)
            applied = []
            if has_records:
                cur.execute("SELECT version FROM migrations.history ORDER BY version")
                applied = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    return {"server_version": version, "server_major": version_num // 10000, "db_size": size,
            "dbname": dbname, "applied": applied, "schema_version": applied[-1] if applied else None,
            "identity": identity}


def _fail(msg, url, run_id, check_mode, started, fields):
    """Record the failed backup (real runs) and raise the operator's error."""
    fields = dict(fields, verified=False)
    if not check_mode and url:
        log_event_autonomous(url, run_id or "adhoc", "backup", "failed", version=fields.get("schema_version"),
                             duration_ms=int((time.time() - started) * 1000),
                             detail=dict(redact_obj(fields), error=redact(msg)))
    raise LedgerError(msg, **fields)


def _remove_partials(partial, final_path):
    """This run's own temporary files: the partial dump and a staged manifest (never another run's)."""
    _remove(partial)
    tag = partial.rsplit(".partial-", 1)[1]
    staged = "%s.partial-%s" % (manifest_path_for(final_path), tag)
    if os.path.exists(staged):
        os.unlink(staged)


def _remove(path):
    import shutil
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def _full_disk(path):
    """Why a dump that pg_dump finished may be cut short: its filesystem is full (pg_dump does not see an
    ENOSPC hit while it flushes its last block before rewriting its table of contents, and exits 0)."""
    try:
        st = os.statvfs(os.path.dirname(path))
    except OSError:
        return ""
    if st.f_bavail * st.f_frsize >= st.f_frsize * 2:
        return ""
    return ("; its filesystem is full (No space left on device: %s free), which cut pg_dump's output short"
            % human_bytes(st.f_bavail * st.f_frsize))


def _write_failure(target, backup_dir, exc, needed, rerun):
    """The refusal for an OS error while writing the backup (ENOSPC, EFBIG, EDQUOT, EACCES, ...)."""
    try:
        st = os.statvfs(backup_dir)
        free = human_bytes(st.f_bavail * st.f_frsize)
    except OSError:
        free = "unknown"
    return ("backup of %s failed writing to %s: %s. The backup needs about %s there (the database's size x "
            "backup_space_margin); %s free now. Nothing was kept (this run's partial files were removed) and nothing "
            "was migrated. Free space (or set backup_dir), then re-run: %s" % (
                target, backup_dir, exc.strerror or exc, human_bytes(needed), free, rerun))


def _restore_and_compare(url, bindir, backup_path, source_counts, jobs, env, conninfo, connect_timeout, progress):
    """Restore into a scratch database on the same server, compare per-table row counts, drop it."""
    scratch = "ledger_verify_%s" % uuid.uuid4().hex[:12]
    admin = connect(url, autocommit=True, connect_timeout=connect_timeout)
    try:
        with admin.cursor() as cur:
            try:
                cur.execute('CREATE DATABASE "%s" TEMPLATE template0' % scratch)
            except psycopg2.Error as exc:
                err = pg_error(exc)
                raise LedgerError("cannot create the scratch database for backup_verify=restore: %s; grant CREATEDB "
                                  "to the migration role or use backup_verify=read" % format_pg_error(err),
                                  sqlstate=err["sqlstate"])
        try:
            progress.set("restoring into scratch database %s" % scratch)
            cmd = [os.path.join(bindir, "pg_restore"), "--exit-on-error", "--no-password",
                   "-d", url_with_database(conninfo, scratch)]
            if jobs > 1:
                cmd += ["-j", str(jobs)]
            res = subprocess.run(cmd + [backup_path], capture_output=True, text=True, env=env, check=False)
            if res.returncode != 0:
                raise LedgerError("the backup does not restore: pg_restore into scratch database %s exited %d: %s"
                                  % (scratch, res.returncode, redact(res.stderr.strip())[-1500:]),
                                  restore_rc=res.returncode)
            progress.set("counting rows in the restored copy")
            copy = connect(url_with_database(url, scratch), autocommit=True, connect_timeout=connect_timeout)
            try:
                with copy.cursor() as cur:
                    restored_counts = count_rows(cur)
            finally:
                copy.close()
        finally:
            with admin.cursor() as cur:
                cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % scratch)
    finally:
        admin.close()
    mismatches = []
    for table in sorted(set(source_counts) | set(restored_counts)):
        if source_counts.get(table) != restored_counts.get(table):
            mismatches.append({"table": table, "source": source_counts.get(table),
                               "restored": restored_counts.get(table)})
    return scratch, restored_counts, mismatches


def run_backup(params, check_mode=False):
    """One backup, verified; returns the result dict or raises LedgerError (fields for the result)."""
    started = time.time()
    started_at = utc_iso()
    url = params["database_url"]
    target = describe_target(url)
    run_id = params.get("run_id")
    fmt = params.get("format") or "custom"
    jobs = int(params.get("jobs") or 1)
    compress = int(params.get("compress") if params.get("compress") is not None else 1)
    verify = params.get("verify") or "read"
    rerun = params.get("rerun_command") or default_rerun()
    connect_timeout = int(params.get("connect_timeout") or 10)
    if jobs < 1:
        raise LedgerError("backup_jobs must be 1 or more (got %d)" % jobs, target=target)
    if jobs > 1 and fmt != "directory":
        raise LedgerError("backup_jobs=%d needs backup_format=directory (pg_dump dumps in parallel only in "
                          "directory format)" % jobs, target=target)
    if not 0 <= compress <= 9:
        raise LedgerError("backup_compress must be 0-9 (got %d)" % compress, target=target)

    try:
        facts = _server_facts(url, connect_timeout)
    except LedgerError as exc:
        raise LedgerError("%s; check database_url and the server, then re-run: %s" % (exc.msg, rerun),
                          **dict(exc.fields, target=target, verified=False))
    except psycopg2.Error as exc:
        err = pg_error(exc)
        raise LedgerError("cannot read the size and schema version of %s: %s; grant the migration role access, "
                          "then re-run: %s" % (target, format_pg_error(err), rerun), target=target,
                          sqlstate=err["sqlstate"], verified=False)
    slug = target_slug(url)
    stamp = utc_stamp()
    backup_dir = os.path.abspath(params["backup_dir"])
    # The name a --check run reports; a real run reserves it (or the next free one) exclusively below.
    final_path = os.path.join(backup_dir, backup_basename(slug, facts["schema_version"], stamp, run_id)
                              + FORMAT_SUFFIX[fmt])
    needed = int(facts["db_size"] * float(params.get("space_margin") or 1.2))
    verify_method = "pg_dump exit status + sha256 + full read (pg_restore -f /dev/null)"
    if verify == "restore":
        verify_method += " + restore into a scratch database with per-table row counts compared"
    base = {"target": target, "target_slug": slug, "system_identifier": facts["identity"]["system_identifier"],
            "database": facts["dbname"], "schema_version": facts["schema_version"],
            "server_version": facts["server_version"], "database_size_bytes": facts["db_size"],
            "format": fmt, "compress": compress, "jobs": jobs, "verify_method": verify_method}

    dir_state = check_backup_dir(backup_dir, needed_bytes=needed)
    if dir_state["problems"]:
        _fail("backup of %s refused: %s. Fix it, then re-run: %s" % (target, "; ".join(dir_state["problems"]),
                                                                     rerun),
              url, run_id, check_mode, started, dict(base, backup_dir=dir_state))

    try:
        bindir = find_bindir(facts["server_major"], params.get("pg_bindir"))
    except LedgerError as exc:
        _fail(exc.msg, url, run_id, check_mode, started, base)
    pg_dump = os.path.join(bindir, "pg_dump")
    dump_version = tool_version(pg_dump)
    if (tool_major(dump_version) or 0) < facts["server_major"]:
        _fail("%s is older than the server (PostgreSQL %s) and cannot dump it: install postgresql-client-%d or set "
              "backup_pg_bindir" % (dump_version, facts["server_version"], facts["server_major"]),
              url, run_id, check_mode, started, base)
    base["pg_dump_version"] = dump_version

    if check_mode:
        result = dict(base, changed=True, skipped=False, verified=False, backup_file=final_path,
                      backup_dir_created=dir_state["would_create"], removed=[],
                      msg="would back up %s (%s) to %s%s, verified by %s" % (
                          target, human_bytes(facts["db_size"]), final_path,
                          " (creating %s 0700)" % backup_dir if dir_state["would_create"] else "", verify_method))
        return result

    old_umask = os.umask(0o077)
    try:
        created_dir = ensure_backup_dir(backup_dir)
        base["space_needed_bytes"] = needed
        # Every file of this run is its own: two runs in one second never share a name (run id in it,
        # the partial created with O_EXCL / mkdir); a full disk here is a clean refusal.
        try:
            final_path, partial = reserve_backup_path(backup_dir, slug, facts["schema_version"], stamp, run_id,
                                                      FORMAT_SUFFIX[fmt], directory=fmt == "directory")
        except OSError as exc:
            _fail(_write_failure(target, backup_dir, exc, needed, rerun), url, run_id, False, started,
                  dict(base, errno=exc.errno))
        return _dump_and_verify(params, url, target, run_id, facts, base, bindir, pg_dump, partial, final_path,
                                fmt, jobs, compress, verify, connect_timeout, started, started_at, created_dir)
    finally:
        os.umask(old_umask)


def _dump_and_verify(params, url, target, run_id, facts, base, bindir, pg_dump, partial, final_path, fmt, jobs,
                     compress, verify, connect_timeout, started, started_at, created_dir):
    rerun = params.get("rerun_command") or default_rerun()
    progress = Progress(params.get("progress_file"), facts["db_size"], partial).start()
    source_counts = None
    snap = None
    # Exact counts in the dump's snapshot: what a restore checks its copy against (and verify=restore too).
    want_counts = verify == "restore" or params.get("row_counts") is not False
    try:
        # The snapshot: a REPEATABLE READ transaction held open while pg_dump starts from it and
        # while the rows are counted in it, so the dump and the counts see the same data.
        snap = connect(url, autocommit=False, connect_timeout=connect_timeout)
        snap.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with snap.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (params.get("lock_wait_timeout") or "10s",))
            # As pg_dump does: a row-level security policy that would hide rows makes the count fail
            # rather than come out short (pg_dump fails on it too).
            cur.execute("SELECT set_config('row_security', 'off', true)")
            cur.execute("SELECT pg_export_snapshot()")
            snapshot_id = cur.fetchone()[0]
        cmd = [pg_dump, "--no-password", "--format=%s" % fmt, "--file=%s" % partial, "--compress=%d" % compress,
               "--lock-wait-timeout=%s" % (params.get("lock_wait_timeout") or "10s"), "--snapshot=%s" % snapshot_id]
        if jobs > 1:
            cmd.append("--jobs=%d" % jobs)
        with libpq_env(url, connect_timeout) as (env, conninfo):
            progress.set("dumping")
            dump_started = time.time()
            count_err = None

            def count_while_dumping():
                """The row counts in the dump's snapshot, read while pg_dump runs."""
                nonlocal source_counts, count_err
                if want_counts:
                    try:
                        with snap.cursor() as cur:
                            source_counts = count_rows(cur)
                    except psycopg2.Error as exc:
                        count_err = pg_error(exc)

            rc, dump_err = run_tool(cmd + ["--dbname=%s" % conninfo], env, while_running=count_while_dumping)
            snap.rollback()
            snap.close()
            snap = None
            dump_seconds = round(time.time() - dump_started, 3)
            if rc != 0:
                hint, sqlstate = "", None
                if "could not obtain lock" in dump_err or ("LOCK TABLE" in dump_err and "timeout" in dump_err):
                    sqlstate = "57014" if "statement timeout" in dump_err else "55P03"
                    hint = (" SQLSTATE %s: another session holds an exclusive lock, and pg_dump gave up after "
                            "backup_lock_wait_timeout=%s rather than queue behind it (see the precheck's lock_waits "
                            "and long transaction checks); retry when it is gone." % (
                                sqlstate, params.get("lock_wait_timeout")))
                raise LedgerError("pg_dump of %s failed (exit %d): %s.%s Nothing was kept; re-run: %s"
                                  % (target, rc, dump_err[-1500:] or "no message", hint, rerun),
                                  pg_dump_rc=rc, sqlstate=sqlstate)
            if count_err is not None:
                # pg_dump succeeded, the counts in its snapshot did not (a lock, a permission, a policy).
                hint = ""
                if count_err["sqlstate"] == "55P03":
                    hint = (" Another session holds an exclusive lock on a table, and the count gave up after "
                            "backup_lock_wait_timeout=%s rather than queue behind it (see the precheck's lock_waits "
                            "and long transaction checks); retry when it is gone." % params.get("lock_wait_timeout"))
                raise LedgerError("cannot count the rows of %s in the dump's snapshot (backup_row_counts): %s.%s "
                                  "Nothing was kept; re-run: %s" % (target, format_pg_error(count_err), hint, rerun),
                                  sqlstate=count_err["sqlstate"])
            if fmt == "directory":
                os.chmod(partial, 0o700)
            # Verification, before anything depends on this backup.
            progress.set("verifying: sha256")
            digest, size, files = sha256_path(partial)
            progress.set("verifying: full read (pg_restore -f /dev/null)")
            read = full_read_check(partial, bindir=bindir)
            if not read["ok"]:
                raise LedgerError("the new backup of %s fails the full read (pg_restore -f /dev/null exited %s): %s%s. "
                                  "It was deleted; re-run: %s" % (target, read["rc"], read["error"],
                                                                  _full_disk(partial), rerun), full_read=read)
            restore = None
            if verify == "restore":
                scratch, restored_counts, mismatches = _restore_and_compare(
                    url, bindir, partial, source_counts, jobs, env, conninfo, connect_timeout, progress)
                if mismatches:
                    raise LedgerError("the restored copy of %s's backup differs from the source in %d table(s): %s. "
                                      "It was deleted; re-run: %s" % (
                                          target, len(mismatches), ", ".join(
                                              "%s source %s restored %s" % (m["table"], m["source"], m["restored"])
                                              for m in mismatches[:10]), rerun),
                                      mismatches=mismatches)
                restore = {"scratch_database": scratch, "tables": len(restored_counts),
                           "rows": sum(restored_counts.values())}
        finished_at = utc_iso()
        manifest = dict(
            base, kind="ledger-backup", manifest_format=MANIFEST_FORMAT, file=os.path.basename(final_path),
            database=facts["dbname"], applied=facts["applied"], size_bytes=size, sha256=digest, files=files,
            started_at=started_at, finished_at=finished_at, duration_s=round(time.time() - started, 3),
            dump_seconds=dump_seconds, verified=True, full_read=read, restore_check=restore,
            row_counts=source_counts, row_counts_method="count(*) in the dump's snapshot" if want_counts else None,
            snapshot_consistent=True, run_id=run_id,
        )
        staged = stage_manifest(final_path, manifest, partial.rsplit(".partial-", 1)[1])
        manifest_path = publish_backup(partial, final_path, staged)
    except LedgerError as exc:
        if snap is not None:
            snap.close()
        progress.stop("failed")
        _remove_partials(partial, final_path)
        msg = exc.msg
        if "No space left on device" in msg or "File too large" in msg:
            msg = "%s. The backup needs about %s free in %s (the database's size x backup_space_margin)" % (
                msg, human_bytes(base["space_needed_bytes"]), os.path.dirname(final_path))
        _fail(msg, url, run_id, False, started, dict(base, **exc.fields))
    except OSError as exc:
        if snap is not None:
            snap.close()
        progress.stop("failed")
        _remove_partials(partial, final_path)
        _fail(_write_failure(target, os.path.dirname(final_path), exc, base["space_needed_bytes"], rerun),
              url, run_id, False, started, dict(base, errno=exc.errno))
    except psycopg2.Error as exc:
        if snap is not None:
            snap.close()
        progress.stop("failed")
        _remove_partials(partial, final_path)
        err = pg_error(exc)
        _fail("backup of %s failed: %s; re-run: %s" % (target, format_pg_error(err), rerun),
              url, run_id, False, started, dict(base, sqlstate=err["sqlstate"]))
    progress.stop("done")
    removed = apply_retention(os.path.dirname(final_path), base["target_slug"], int(params.get("retention") or 0),
                              identity=facts["identity"])
    duration_ms = int((time.time() - started) * 1000)
    log_event_autonomous(url, run_id or "adhoc", "backup", "ok", version=facts["schema_version"],
                         duration_ms=duration_ms,
                         detail={"file": final_path, "sha256": digest, "size_bytes": size,
                                 "verified": True, "verify_method": base["verify_method"], "removed": removed})
    return dict(
        base, changed=True, skipped=False, backup_file=final_path, manifest=manifest_path, sha256=digest,
        size_bytes=size, verified=True, removed=removed, backup_dir_created=created_dir, row_counts=source_counts,
        restore_check=restore, duration_s=round(duration_ms / 1000.0, 3), dump_seconds=dump_seconds,
        msg="backed up %s to %s (%s, sha256 %s), verified by %s%s" % (
            target, final_path, human_bytes(size), digest[:12], base["verify_method"],
            "; retention removed %d old backup(s)" % len(removed) if removed else ""),
    )


SPEC_OPTIONS = {}


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_backup.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    return module_result("ledger_backup", run_backup, params, check_mode, unexpected_fields={"verified": False})


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
