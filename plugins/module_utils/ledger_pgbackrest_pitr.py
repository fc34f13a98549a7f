# -*- coding: utf-8 -*-
"""rollback_mode=restore with a pgBackRest manifest: point-in-time recovery to the run's restore point.

The target is never touched until the recovered copy has proven itself:
  0. the cluster's PITR lock and the target's run lease are taken (ledger_pgbackrest_lease.py:
     a second PITR, migrate, revert or dump restore waits within its lock wait, then refuses
     naming this run);
  1. what would be lost is counted (under the lease) (WAL bytes and transaction ids since the restore point, the
     target's events after it, the versions applied since) and, without allow_data_loss, refused;
  2. pgbackrest restores the manifest's backup into a NEW data directory beside the target's,
     with recovery to the named restore point (then promote) on the manifest's timeline;
  3. that copy starts on a spare port with a private socket and archiving suspended
     (archive_command '' keeps its WAL for later; nothing of a failed attempt reaches the
     repository), recovers, and must have stopped at the restore point, with the manifest's
     history and exact row counts;
  4. only then: this run's lease row is written into the copy (so the target comes back leased
     to this run), the copy is stopped, the target stopped, the directories swapped (the old one kept
     as `<data>.pre_pitr_<stamp>`) and the target started; if that start fails, the swap is undone
     and the target started as it was.
PITR rewinds the whole cluster (every database in it), and restarts it: the refusal says so.

Stopping the playbook stops the recovery up to step 4 (ledger_lifeline: the death signal, or the watch
of ansible-playbook when run as a module), with pgbackrest, psql, pg_ctl and the copy's postmaster
(this process's children); right before the swap the death signal is disarmed and the playbook checked
once more (gone: no swap, the copy removed); the swap itself then runs to a started target and its event.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    COUNTABLE_TABLES_SQL,
    find_bindir,
    human_bytes,
    read_manifest,
    same_target,
    server_identity,
    target_slug,
    utc_stamp,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    RECORDS_DDL,
    LedgerError,
    connect,
    ensure_records,
    log_event,
    log_event_autonomous,
    redact,
    redact_obj,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import Lifeline
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import extra_var, playbook_command
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest import MANIFEST_KIND, MANIFEST_SUFFIX, tail
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_lease import ClusterLock, copy_lease_sql
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import (
    copy_estimate,
    pitr_directories,
    remove_command,
    room_beside,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_restore_lease import RestoreLease

# Seconds the lease outlives the swap (stop, rename, start: pg_ctl waits at most 120 s each way).
SWAP_HOLD = 300

COUNTS_SQL = ("SELECT coalesce(json_object_agg(n || '.' || r, (xpath('/row/c/text()', query_to_xml("
              "format('SELECT count(*) AS c FROM %%I.%%I', n, r), false, true, '')))[1]::text::bigint), '{}')"
              " FROM (%s) AS t(n, r)" % COUNTABLE_TABLES_SQL)


def find_manifest(backup_dir, backup_file, slug, identity):
    """The manifest to recover to: `backup_file`, else the newest verified one of the target."""
    if backup_file:
        manifest = read_manifest(backup_file)
        if manifest.get("kind") != MANIFEST_KIND:
            raise LedgerError("%s is not a pgBackRest restore point manifest (kind %s): a pg_dump backup is "
                              "restored with backup_method=pg_dump" % (backup_file, manifest.get("kind")))
        manifest["manifest_path"] = os.path.abspath(backup_file)
        return manifest
    found = []
    for path in glob.glob(os.path.join(str(backup_dir or ""), "*" + MANIFEST_SUFFIX)):
        try:
            data = read_manifest(path)
        except LedgerError:
            continue
        if data.get("kind") == MANIFEST_KIND and data.get("verified") is True and same_target(data, slug, identity):
            data["manifest_path"] = os.path.abspath(path)
            found.append(data)
    if not found:
        raise LedgerError("no pgBackRest restore point manifest of this target in %s: pass -e backup_file=PATH "
                          "(a *.pitr.json written by the backup stage)" % backup_dir)
    return max(found, key=lambda m: m.get("finished_at") or "")


def _server(cur):
    cur.execute("SELECT current_setting('data_directory'), current_setting('port')::int,"
                " current_setting('config_file'), current_setting('hba_file'), current_setting('ident_file'),"
                " current_setting('server_version_num')::int / 10000,"
                " (SELECT array_agg(datname ORDER BY datname) FROM pg_database WHERE NOT datistemplate),"
                " (SELECT array_agg(spcname) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')),"
                " pg_walfile_name(pg_current_wal_lsn())")
    keys = ("data_directory", "port", "config_file", "hba_file", "ident_file", "major", "databases", "tablespaces",
            "walfile")
    return dict(zip(keys, cur.fetchone()), copy_estimate=copy_estimate(cur))


def data_at_risk(cur, manifest):
    """What a recovery to the manifest's restore point discards, measured on the live target."""
    cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint,"
                " pg_snapshot_xmax(pg_current_snapshot())::text", (manifest["restore_point_lsn"],))
    wal_bytes, next_xid = cur.fetchone()
    risk = {"wal_bytes": int(wal_bytes), "transaction_ids": int(next_xid) - int(manifest["next_xid"]),
            "events": 0, "event_actions": [], "versions_applied_since": [], "versions_reverted_since": []}
    cur.execute("SELECT to_regclass('migrations.events') IS NOT NULL")
    if cur.fetchone()[0]:
        cur.execute("SELECT count(*), coalesce(array_agg(DISTINCT action), '{}') FROM migrations.events"
                    " WHERE at > %s::timestamptz", (manifest["restore_point_time"],))
        risk["events"], risk["event_actions"] = cur.fetchone()
        cur.execute("SELECT version FROM migrations.history ORDER BY version")
        now = [r[0] for r in cur.fetchall()]
        risk["versions_applied_since"] = [v for v in now if v not in manifest.get("applied", [])]
        risk["versions_reverted_since"] = [v for v in manifest.get("applied", []) if v not in now]
    return risk


def spare_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postmaster_options(data_dir):
    """The target's own start options (postmaster.opts without the binary and -D), for pg_ctl -o."""
    try:
        with open(os.path.join(data_dir, "postmaster.opts")) as fh:
            argv = shlex.split(fh.read())
    except OSError as exc:
        raise LedgerError("cannot read %s/postmaster.opts (how the target was started): %s" % (data_dir, exc))
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "-D":
            skip = True
            continue
        if arg.startswith("--pgdata=") or arg.startswith("-D"):
            continue
        out.append(arg)
    return " ".join(shlex.quote(a) for a in out)


class Instance(object):
    """A PostgreSQL of a data directory, driven with pg_ctl and psql as the cluster's OS user.

    with_parent (the recovered copy): its commands, and its postmaster, die with this process.
    """

    def __init__(self, user, bindir, data_dir, log, with_parent=False):
        self.user, self.bindir, self.data_dir, self.log = user, bindir, data_dir, log
        self.with_parent, self.proc = with_parent, None

    def pg_ctl(self, *args, **kw):
        return self.user.run([os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir] + list(args),
                             with_parent=self.with_parent, **kw)

    def spawn(self, options, timeout):
        """Start the postmaster as this process's own child (pg_ctl's would be a daemon that outlives a
        killed run) and wait until it accepts connections (postmaster.pid says ready or standby, as pg_ctl -w).
        """
        cmd, env, kw = self.user.spawn([os.path.join(self.bindir, "postgres"), "-D", self.data_dir] + options,
                                       with_parent=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd="/", env=env, **kw)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise LedgerError("the recovered copy did not start (exit %s): %s"
                                  % (self.proc.returncode, self.log_tail()))
            try:
                with open(os.path.join(self.data_dir, "postmaster.pid")) as fh:
                    lines = fh.read().splitlines()
                if len(lines) > 7 and lines[7].strip() in ("ready", "standby"):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise LedgerError("the recovered copy did not accept connections within %s s: %s" % (timeout, self.log_tail()))

    def reap(self):
        """Wait for a spawned postmaster that was stopped (no zombie left)."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def start(self, options, timeout=120, check=True):
        return self.pg_ctl("-l", self.log, "-w", "-t", str(timeout), "-o", options, "start", check=check,
                           timeout=timeout + 30)

    def stop(self, check=True):
        return self.pg_ctl("-m", "fast", "-w", "-t", "120", "stop", check=check, timeout=180)

    def running(self):
        code, _out, _err = self.pg_ctl("status", check=False, timeout=30)
        return code == 0

    def log_tail(self, lines=8):
        try:
            with open(self.log) as fh:
                return tail(fh.read(), lines)
        except OSError:
            return ""


def _psql(inst, sock, port, db, query, timeout=None):
    _code, out, _err = inst.user.run([os.path.join(inst.bindir, "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
                                      "-h", sock, "-p", str(port), "-U", inst.user.name, "-d", db, "-c", query],
                                     timeout=timeout, with_parent=inst.with_parent)
    return out.strip()


def _recover(p, repo, manifest, server, inst, sock, port, progress, lease):
    """pgbackrest restore into new_dir, start it, let it pause at the restore point, check it, promote it.

    The copy pauses there (target-action=pause) so that it is checked exactly at the restore
    point, read-only: its replay must have stopped at the manifest's LSN (another restore point
    of the same name earlier in the WAL would stop it sooner), and its history and row counts
    must be the manifest's. Only then is it promoted.
    """
    user, new_dir = repo.user, inst.data_dir
    user.makedirs(new_dir)
    progress("pgbackrest restore of %s into %s" % (manifest["backup_label"], new_dir))
    code, out, err = repo.run("--pg1-path=%s" % new_dir, "--set=%s" % manifest["backup_label"], "--type=name",
                              "--target=%s" % manifest["restore_point"], "--target-action=pause",
                              "--target-timeline=%d" % manifest["timeline"], "restore",
                              timeout=p["recovery_timeout"], check=False, with_parent=True)
    if code != 0:
        raise LedgerError("pgbackrest restore of backup %s failed (exit %d): %s"
                          % (manifest["backup_label"], code, tail(err or out)))
    opts = ["-p", str(port), "-c", "listen_addresses=", "-c", "unix_socket_directories=%s" % sock,
            "-c", "archive_command=", "-c", "external_pid_file=", "-c", "shared_buffers=128MB",
            "-c", "ssl=off", "-c", "logging_collector=off", "-c", "hot_standby=on"]
    if not server["config_file"].startswith(server["data_directory"].rstrip("/") + "/"):
        # Debian-style clusters keep their config outside the data directory.
        opts += ["-c", "config_file=%s" % server["config_file"], "-c", "hba_file=%s" % server["hba_file"],
                 "-c", "ident_file=%s" % server["ident_file"], "-c", "data_directory=%s" % new_dir]
    progress("recovering to %s on port %d" % (manifest["restore_point"], port))
    inst.spawn(opts, p["recovery_timeout"])
    deadline = time.time() + p["recovery_timeout"]
    while True:
        try:
            state = _psql(inst, sock, port, "postgres", "SELECT pg_is_in_recovery()::text || ' ' ||"
                          " pg_get_wal_replay_pause_state() || ' ' || coalesce(pg_last_wal_replay_lsn()::text, '')",
                          timeout=30)
        except LedgerError:
            if not inst.running():
                raise LedgerError("recovery stopped before the restore point %s: %s"
                                  % (manifest["restore_point"], inst.log_tail()))
            state = "true not_paused "
        if state.startswith("false"):
            raise LedgerError("the copy left recovery without pausing at %s: %s"
                              % (manifest["restore_point"], inst.log_tail()))
        if state.split(" ")[1] == "paused":
            break
        if time.time() > deadline:
            raise LedgerError("recovery did not reach %s within %s s (replayed up to %s)"
                              % (manifest["restore_point"], p["recovery_timeout"], state.split(" ")[-1]))
        progress("recovering to %s (%s), replayed up to %s"
                 % (manifest["restore_point"], manifest["restore_point_lsn"], state.split(" ")[-1]))
        time.sleep(0.3)
    replayed = state.split(" ")[-1]
    same = _psql(inst, sock, port, "postgres", "SELECT (pg_last_wal_replay_lsn() = '%s'::pg_lsn)::text"
                 % manifest["restore_point_lsn"].replace("'", ""))
    if same != "true":
        raise LedgerError("recovery stopped at %s, not at the restore point's LSN %s: another restore point named "
                          "%s comes first in the WAL"
                          % (replayed, manifest["restore_point_lsn"], manifest["restore_point"]))
    log = inst.log_tail(200)
    stop_line = 'recovery stopping at restore point "%s"' % manifest["restore_point"]
    if stop_line not in log:
        raise LedgerError("the copy recovered, but its log does not say %r: %s" % (stop_line, inst.log_tail()))
    db = manifest["database"]
    history = _psql(inst, sock, port, db, "SELECT coalesce(string_agg(version, ',' ORDER BY version), '')"
                    " FROM migrations.history" if manifest.get("applied") else "SELECT ''")
    history = [v for v in history.split(",") if v]
    check = {"history": history, "history_ok": history == list(manifest.get("applied") or [])}
    if manifest.get("row_counts") is not None:
        progress("counting rows in the recovered copy")
        counts = json.loads(_psql(inst, sock, port, db, COUNTS_SQL) or "{}")
        differ = dict((t, {"manifest": manifest["row_counts"].get(t), "recovered": counts.get(t)})
                      for t in set(counts) | set(manifest["row_counts"])
                      if counts.get(t) != manifest["row_counts"].get(t))
        check.update(row_counts_checked=len(counts), row_counts_differ=differ)
    if not check["history_ok"] or check.get("row_counts_differ"):
        raise LedgerError("the recovered copy does not match the manifest: history %s (manifest %s), row counts "
                          "differing: %s" % (history, manifest.get("applied"), check.get("row_counts_differ") or
                                             "none"), check=check)
    check["stopped_at"] = replayed
    progress("promoting the recovered copy")
    if _psql(inst, sock, port, "postgres", "SELECT pg_promote(true, 120)::text", timeout=150) != "true":
        raise LedgerError("the recovered copy did not promote within 120 s: %s" % inst.log_tail())
    # The target must come back leased to this run: nobody slips in between its start and our event.
    if _psql(inst, sock, port, db, "SELECT to_regclass('migrations.lock') IS NULL") == "t":
        _psql(inst, sock, port, db, RECORDS_DDL)
    _psql(inst, sock, port, db, copy_lease_sql(lease, SWAP_HOLD))
    inst.stop()
    inst.reap()
    return check


def _swap_and_start(repo, server, names, log, bindir, lease, lifeline):
    """Stop the target, swap the data directories (pitr_directories' names) and start it; on failure put the old
    one back.

    The point of no return: only while the playbook that started it lives; then to its end, whoever dies.
    """
    lease.park(SWAP_HOLD)  # no heartbeat while the server is down; the old one's row outlives the swap
    # A stopped target with its directories renamed is the worst state a kill can leave: the swap (seconds)
    # runs to a started target once begun. Disarmed first, then checked: a playbook that died before
    # either killed us (armed) or is seen here.
    lifeline.disarm()
    if not lifeline.parent_alive():
        raise LedgerError("the playbook that started this recovery is gone (its process exited): the swap was not "
                          "done", refused="parent_gone")
    data_dir = server["data_directory"]
    new_dir, pre_dir = names["copy"], names["kept"]
    options = postmaster_options(data_dir)
    target = Instance(repo.user, bindir, data_dir, log)

    def restart_as_it_was(why):
        back, _o, _e = target.start(options, check=False) if not target.running() else (0, "", "")
        raise LedgerError("%s; the target's own data directory was left in place and %s"
                          % (why, "the target runs again as it was" if back == 0 else
                             "it did NOT start: start it by hand (%s)" % target.log_tail(3)))
    try:
        target.stop()
    except LedgerError as exc:
        restart_as_it_was("could not stop the target for the swap: %s" % exc.msg)
    try:
        os.rename(data_dir, pre_dir)
    except OSError as exc:
        restart_as_it_was("could not move %s aside: %s" % (data_dir, exc))
    try:
        os.rename(new_dir, data_dir)
    except OSError as exc:
        os.rename(pre_dir, data_dir)
        restart_as_it_was("could not move the recovered copy into %s: %s" % (data_dir, exc))
    code, out, err = target.start(options, check=False)
    if code == 0:
        return
    failed_dir = names["failed"]
    if target.running():
        target.stop(check=False)
    os.rename(data_dir, failed_dir)
    os.rename(pre_dir, data_dir)
    back, _o, _e = target.start(options, check=False)
    raise LedgerError("the recovered data directory did not start as the target (%s); it was moved to %s and the "
                      "target's own data directory put back: %s"
                      % (tail(err or out, 3), failed_dir,
                         "the target runs again as it was" if back == 0 else
                         "it did NOT start either: start it by hand (%s)" % target.log_tail(3)))


def _take_lease(p, url, run_id, label):
    """The target's run lease (migrate's, revert's and the dump restore's), or a refusal naming its holder."""
    conn = connect(url, connect_timeout=p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            ensure_records(cur)  # the lease lives in migrations.lock
    finally:
        conn.close()
    return RestoreLease(url, run_id, p["lock_ttl"], p["lock_wait"], p["connect_timeout"],
                        advice=_PitrAdvice(label)).acquire()


class _PitrAdvice(object):
    def __init__(self, host):
        self.host = host

    def migrate(self):
        return playbook_command("rollback", self.host, "-e rollback_mode=restore -e backup_method=pgbackrest")


def run_restore(p, repo, target, check_mode, progress):
    started = time.time()
    url, run_id = p["database_url"], p["run_id"]
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            identity = server_identity(cur)
            manifest = find_manifest(p.get("backup_dir"), p.get("backup_file"), target_slug(url), identity)
            if str(manifest.get("system_identifier")) != str(identity["system_identifier"]):
                raise LedgerError("manifest %s is of another cluster (system_identifier %s, the target's %s): "
                                  "nothing was changed" % (manifest["manifest_path"], manifest.get("system_identifier"),
                                                           identity["system_identifier"]))
            server = _server(cur)
            risk = data_at_risk(cur, manifest) if check_mode else None
    finally:
        conn.close()
    if check_mode:
        return _restore(p, repo, target, True, progress, started, manifest, server, risk, None, None)
    label = p.get("host_label") or "<host>"
    # The work dies with the playbook up to the swap (Ansible's worker is in its own session: see ledger_lifeline).
    lifeline = Lifeline(p.get("playbook_pid"), channel=p.get("watch_channel")).die_with_parent()
    # One PITR per cluster, and the target's run lease: see ledger_pgbackrest_lease.py.
    cluster_lock = ClusterLock(server["data_directory"], run_id, target, p["lock_wait"], repo.user.pw, url).acquire()
    lease = None
    try:
        lease = _take_lease(p, url, run_id, label)
        conn = connect(url)
        try:
            with conn.cursor() as cur:
                # Counted under the lease: no other run changes the target from here on.
                risk = data_at_risk(cur, manifest)
        finally:
            conn.close()
        return _restore(p, repo, target, False, progress, started, manifest, server, risk, lease, lifeline)
    finally:
        if lease is not None and lease.held:
            lease.release()
        cluster_lock.release()


def _restore(p, repo, target, check_mode, progress, started, manifest, server, risk, lease, lifeline):
    url, run_id = p["database_url"], p["run_id"]
    rp = manifest["restore_point"]
    summary = ("point-in-time recovery of %s to %s (LSN %s, %s) rewinds the whole cluster (databases: %s) and "
               "restarts it; it discards %s of WAL written since, up to %d transactions, %d event(s) of this "
               "database (%s)%s"
               % (target, rp, manifest["restore_point_lsn"], manifest["restore_point_time"],
                  ", ".join(server["databases"] or []), human_bytes(risk["wal_bytes"]), risk["transaction_ids"],
                  risk["events"], ", ".join(sorted(risk["event_actions"])) or "none",
                  ("; versions applied since, undone: %s" % ", ".join(risk["versions_applied_since"]))
                  if risk["versions_applied_since"] else ""))
    fields = {"method": "pgbackrest", "restore_point": rp, "manifest": manifest["manifest_path"],
              "data_at_risk": risk, "backup_label": manifest["backup_label"]}
    if lease is not None:
        fields["lease_waited_s"] = lease.waited_s
    if server["tablespaces"]:
        raise LedgerError("%s has tablespaces (%s): a recovery into a new data directory would restore them over the "
                          "live ones; recover by hand (pgbackrest restore --tablespace-map). Nothing was changed."
                          % (target, ", ".join(server["tablespaces"])), **fields)
    if not p["allow_data_loss"]:
        if check_mode:
            return dict(fields, changed=True, msg="would refuse without rollback_allow_data_loss=true: " + summary)
        raise LedgerError(
            "refused: %s. Nothing was changed. To recover anyway, accepting that loss: %s" % (summary, playbook_command(
                "rollback", p.get("host_label"), "-e rollback_mode=restore -e backup_method=pgbackrest %s "
                "-e rollback_allow_data_loss=true" % extra_var("backup_file", manifest["manifest_path"]))), **fields)
    stamp = utc_stamp()
    data_dir = server["data_directory"].rstrip("/")
    names = pitr_directories(data_dir, stamp)
    new_dir, pre_dir = names["copy"], names["kept"]
    room = room_beside(data_dir, server["copy_estimate"], p["space_margin"])
    parent, free, needed = room["path"], room["free_bytes"], room["needed_bytes"]
    fields.update(space=room, new_data_directory=new_dir)
    if free is not None and free < needed:
        raise LedgerError("not enough room beside %s for the recovered copy: %s. Nothing was changed."
                          % (data_dir, room["text"]), **fields)
    if check_mode:
        return dict(fields, changed=True, msg="would recover (consented): " + summary + "; into %s, %s free" %
                    (new_dir, human_bytes(free)))
    # Named after the copy: a killed run leaves it (the copy's socket and recovery.log) beside <data>.pitr_<stamp>.
    sock = tempfile.mkdtemp(prefix=names["socket_prefix"])
    os.chown(sock, repo.user.pw.pw_uid, repo.user.pw.pw_gid) if os.geteuid() == 0 else None
    bindir = find_bindir(server["major"], p.get("pg_bindir"))
    server_log = os.path.join(parent, "server.log")
    start_log = server_log if os.path.exists(server_log) else os.path.join(parent, "postgresql-pitr-start.log")
    swapped = False
    inst = Instance(repo.user, bindir, new_dir, os.path.join(sock, "recovery.log"), with_parent=True)
    try:
        try:
            check = _recover(p, repo, manifest, server, inst, sock, spare_port(), progress, lease)
            progress("swapping %s in and starting the target" % new_dir)
            _swap_and_start(repo, server, names, start_log, bindir, lease, lifeline)
            swapped = True
        finally:
            if not swapped and os.path.isdir(new_dir):
                if inst.running():
                    inst.stop(check=False)
                shutil.rmtree(new_dir, ignore_errors=True)
            if inst.proc is not None and inst.proc.poll() is None and not swapped:
                inst.proc.kill()  # a copy pg_ctl could not stop
            inst.reap()
            shutil.rmtree(sock, ignore_errors=True)
    except LedgerError as exc:
        msg = ("point-in-time recovery of %s to %s failed: %s. The target's data directory was not replaced (the "
               "copy was removed); re-run after the fix: %s" % (target, rp, exc.msg, p["rerun_command"]))
        log_event_autonomous(url, run_id, "restore", "failed", duration_ms=int((time.time() - started) * 1000),
                             detail=dict(redact_obj(fields), error=redact(exc.msg)))
        raise LedgerError(msg, **dict(exc.fields, **fields))
    # The target runs on the recovered data: its history must be the manifest's; log the restore there.
    deadline = time.time() + 60
    while True:
        try:
            conn = connect(url)
            break
        except LedgerError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            ensure_records(cur)
            # The lease came back with the data (written into the copy): the event and its release go together.
            cur.execute("DELETE FROM migrations.lock WHERE id = 1 AND run_id = %s AND holder = %s RETURNING 1",
                        (lease.run_id, lease.holder))
            fields["lease_kept_through_swap"] = cur.fetchone() is not None
            cur.execute("SELECT version FROM migrations.history ORDER BY version")
            history = [r[0] for r in cur.fetchall()]
            duration = time.time() - started
            log_event(cur, run_id, "restore", "ok" if history == list(manifest.get("applied") or []) else "mismatch",
                      version=history[-1] if history else None, duration_ms=int(duration * 1000),
                      detail=dict(fields, previous_data_directory=pre_dir, check=check, history=history))
        conn.commit()
        lease.held = False
    finally:
        conn.close()
    if history != list(manifest.get("applied") or []):
        raise LedgerError("the target restarted on the recovered data, but its history %s differs from the "
                          "manifest's %s" % (history, manifest.get("applied")), **fields)
    return dict(fields, changed=True, history=history, check=check, previous_data_directory=pre_dir,
                duration_s=round(duration, 3),
                drop_previous=remove_command([pre_dir]),
                msg="recovered %s to %s in %.1f s: history %s, %s; %s. The data directory as it was is kept in %s "
                    "(remove it once nothing in it is wanted)."
                    % (target, rp, duration, ",".join(history) or "base",
                       "%d tables' row counts match the manifest" % check["row_counts_checked"]
                       if "row_counts_checked" in check else "row counts not recorded",
                       summary.split("; it ")[-1].replace("discards", "discarded"), pre_dir))
