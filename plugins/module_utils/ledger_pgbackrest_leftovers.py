# -*- coding: utf-8 -*-
"""Data directories a point-in-time recovery leaves beside the cluster's: one home for their names, the room a
recovery needs, and what the precheck says about them.

A PITR (ledger_pgbackrest_pitr.py) restores into ``<data>.pitr_<stamp>`` (with its socket and recovery.log in
``<tmp>/ledger-pitr-<stamp>-<cluster mark>-*``), and at the swap keeps the data directory as it was as ``<data>.pre_pitr_<stamp>``;
a copy that did not start as the target is moved to ``<data>.pitr_<stamp>.failed``. Each is the size of the whole
cluster. A failed PITR that survives removes its copy; a killed one (a reboot, SIGKILL) cannot, and every finished
one keeps ``pre_pitr`` on purpose (rows written after the restore point live only there). The precheck of
backup_method=pgbackrest lists them with size, age and the command that removes each; it never removes anything.

A copy is in use while the PITR that made it runs: the cluster's PITR lock (ledger_pgbackrest_lease.py) is held,
and its holder took it before it stamped the copy.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shlex
import stat
import tempfile
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest import human_age
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_lease import describe_holder, lock_path

COPY = ".pitr_"
KEPT = ".pre_pitr_"
FAILED = ".failed"
SOCKET_PREFIX = "ledger-pitr-"
# utc_stamp()'s form (ledger_backup_utils): 20261201T012345Z.
_STAMP = r"\d{8}T\d{6}Z"
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# What a recovered copy holds besides its databases and pg_wal: pg_xact, pg_multixact, pg_subtrans, pg_stat, the
# configuration and label files. A fresh initdb holds about 1 MiB of it; pg_xact grows 2 bits a transaction, about
# 50 MiB at autovacuum_freeze_max_age's 200 million. None of it is measurable without superuser (pg_ls_dir): a fixed
# allowance, named in the message.
REST_ALLOWANCE = 64 << 20
# The settings that bound the copy's pg_wal, in bytes (current_setting's units, e.g. '1GB', read by any role).
_WAL_SETTINGS = ("max_wal_size", "min_wal_size", "wal_keep_size", "wal_segment_size")
_ESTIMATE_SQL = ("SELECT (SELECT sum(pg_database_size(oid)) FROM pg_database)::bigint, "
                 + ", ".join("pg_size_bytes(current_setting('%s'))" % s for s in _WAL_SETTINGS)
                 + ", has_function_privilege('pg_ls_waldir()', 'EXECUTE')")

KIND_TEXT = {
    "interrupted": "the copy of a point-in-time recovery that was interrupted (killed before its swap)",
    "failed": "the recovered copy that did not start as the target (the swap was undone)",
    "kept": "the cluster as it was before a finished point-in-time recovery (rows written after its restore "
            "point live only here)",
}


def pitr_directories(data_directory, stamp):
    """{copy, kept, failed, socket_prefix}: the paths one PITR stamped `stamp` creates (the only place they are named).

    The socket directory (in the shared temporary directory) carries the cluster's mark as well as the stamp: two
    clusters of one host recovered in the same second (a fleet's rollback) each find only their own.
    """
    base = data_directory.rstrip("/")
    copy = base + COPY + stamp
    return {"copy": copy, "kept": base + KEPT + stamp, "failed": copy + FAILED,
            "socket_prefix": "%s%s-%s-" % (SOCKET_PREFIX, stamp, cluster_mark(base))}


def cluster_mark(data_directory):
    """A short mark of a data directory for names outside it (8 hex digits of its path's sha256)."""
    return hashlib.sha256(data_directory.rstrip("/").encode("utf-8", "surrogateescape")).hexdigest()[:8]


def remove_command(paths, why="once nothing in it is wanted"):
    """What the operator runs (never this code): rm -rf of the paths, as root on the database host."""
    return "rm -rf %s   # as root on the database host, %s" % (" ".join(shlex.quote(p) for p in paths), why)


def estimate_copy(databases, settings, pg_wal):
    """{databases_bytes, wal_bytes, wal_note, rest_bytes, total_bytes}: what a recovered copy of the cluster holds.

    databases: the sum of pg_database_size; settings: _WAL_SETTINGS in bytes; pg_wal: the live pg_wal's size, None
    when this role may not call pg_ls_waldir().

    The WAL part, after PostgreSQL 15's "WAL Configuration": the copy replays WAL restored from the archive into its
    pg_wal, and its restartpoints (like the checkpoints after the swap, when the copy is the live cluster) trim pg_wal
    to about max_wal_size, never below min_wal_size, keeping the newest wal_keep_size plus one more segment; one
    segment more is the one being restored. max_wal_size is a soft limit: heavy load or a lagging archive take pg_wal
    past it, and the live pg_wal shows how far this cluster's workload does, which the copy serves after the swap. So
    the larger of the two; without pg_ls_waldir() the settings' bound alone, and the note says so.
    """
    by_settings = (max(settings["max_wal_size"], settings["min_wal_size"], settings["wal_keep_size"])
                   + 2 * settings["wal_segment_size"])
    setting_text = "max(max_wal_size %s, min_wal_size %s, wal_keep_size %s) + 2 segments of %s" % tuple(
        human_bytes(settings[s]) for s in _WAL_SETTINGS)
    if pg_wal is None:
        wal, note = by_settings, ("WAL %s by the settings, %s; pg_wal NOT measured (this role may not call "
                                  "pg_ls_waldir(): grant it pg_monitor to count a pg_wal past max_wal_size)"
                                  % (human_bytes(by_settings), setting_text))
    else:
        wal = max(by_settings, pg_wal)
        note = "WAL %s, the larger of pg_wal now %s and the settings' %s (%s)" % (
            human_bytes(wal), human_bytes(pg_wal), human_bytes(by_settings), setting_text)
    databases = databases or 0
    return {"databases_bytes": databases, "wal_bytes": wal, "pg_wal_bytes": pg_wal, "wal_settings_bytes": by_settings,
            "wal_note": note, "rest_bytes": REST_ALLOWANCE, "total_bytes": databases + wal + REST_ALLOWANCE}


def copy_estimate(cur):
    """estimate_copy() of the server `cur` is connected to. pg_database_size needs CONNECT on every database (or
    pg_read_all_stats); pg_ls_waldir() superuser or pg_monitor, asked first, so a role without it is no error."""
    cur.execute(_ESTIMATE_SQL)
    row = cur.fetchone()
    pg_wal = None
    if row[-1]:
        cur.execute("SELECT coalesce(sum(size), 0)::bigint FROM pg_ls_waldir()")
        pg_wal = cur.fetchone()[0]
    return estimate_copy(row[0], dict(zip(_WAL_SETTINGS, row[1:-1])), pg_wal)


def room_beside(data_directory, estimate, margin):
    """{path, free_bytes, needed_bytes, estimate, margin, text}: the room a recovery's copy needs beside the data
    directory (estimate_copy()'s total x margin) and what the file system has (free_bytes None when it cannot be
    read). text: the numbers, parts and all, as the PITR's refusal and the precheck both print them."""
    parent = os.path.dirname(data_directory.rstrip("/"))
    try:
        st = os.statvfs(parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    needed = int(estimate["total_bytes"] * margin)
    text = ("%s free in %s; the recovered copy needs %s: (databases %s + %s + the rest of a data directory %s) x the "
            "margin %s" % ("(not measurable)" if free is None else human_bytes(free), parent, human_bytes(needed),
                           human_bytes(estimate["databases_bytes"]), estimate["wal_note"],
                           human_bytes(estimate["rest_bytes"]), margin))
    return {"path": parent, "free_bytes": free, "needed_bytes": needed, "estimate": estimate, "margin": margin,
            "text": text}


def _pattern(data_directory):
    base = re.escape(os.path.basename(data_directory.rstrip("/")))
    return re.compile(r"^%s(?P<kind>%s|%s)(?P<stamp>%s)(?P<failed>%s)?$"
                      % (base, re.escape(COPY), re.escape(KEPT), _STAMP, re.escape(FAILED)))


def _epoch(stamp):
    return calendar.timegm(time.strptime(stamp, _STAMP_FORMAT))


def find_directories(data_directory):
    """[{path, kind, stamp}] beside the data directory, by the names pitr_directories() gives (directories only)."""
    parent = os.path.dirname(data_directory.rstrip("/"))
    pattern = _pattern(data_directory)
    out = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return out
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        kind = "kept" if m.group("kind") == KEPT else "failed" if m.group("failed") else "interrupted"
        out.append({"path": entry.path, "kind": kind, "stamp": m.group("stamp")})
    out.sort(key=lambda d: (d["stamp"], d["path"]))
    return out


def disk_usage(path, deadline):
    """(bytes, None) allocated under path, as du -s counts (symlinks not followed); (None, why) past the deadline or
    on an error: a directory of millions of files must not hang the precheck."""
    total, stack = 0, [path]
    try:
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if time.monotonic() > deadline:
                        return None, "size not measured (still counting when the time limit was up)"
                    st = entry.stat(follow_symlinks=False)
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
    except OSError as exc:
        return None, "size not measured (%s)" % (exc.strerror or exc)
    return total + os.lstat(path).st_blocks * 512, None


def pitr_running(data_directory):
    """(state, holder) of the cluster's PITR lock: ("free", None), ("held", what its file says) or ("unknown", why).

    A shared flock taken for an instant: a PITR holds it exclusively for its whole length; one that starts meanwhile
    retries within its poll (0.3 s). The file is never created here.
    """
    path = lock_path(data_directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "free", None  # no recovery of this cluster ever ran
        return "unknown", "cannot open %s: %s" % (path, exc.strerror)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return "unknown", "cannot lock %s: %s" % (path, exc.strerror)
            try:
                holder = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
            except ValueError:
                holder = {}
            return "held", holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "free", None
    finally:
        os.close(fd)


def _in_use(item, state, holder):
    """Whether the running PITR may still need it: it stamps its directories after taking the lock, so anything
    stamped before its `since` is of an earlier run; without a readable `since`, everything is its."""
    if state != "held":
        return False
    try:
        since = calendar.timegm(time.strptime(str((holder or {}).get("since")), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return True
    return _epoch(item["stamp"]) >= since


def list_leftovers(data_directory, size_timeout, now=None):
    """(leftovers, lock state, lock holder): each with path, kind, stamp, age_s, size_bytes (None when not measured),
    size_note, in_use, sockets, advice and remove_command (None while in use). Interrupted copies are measured
    first (the room of the next recovery depends on them); size_timeout bounds all the measuring."""
    now = time.time() if now is None else now
    state, holder = pitr_running(data_directory)
    found = find_directories(data_directory)
    deadline = time.monotonic() + max(0.0, float(size_timeout))
    for item in sorted(found, key=lambda d: d["kind"] == "kept"):
        item["size_bytes"], item["size_note"] = disk_usage(item["path"], deadline)
    for item in found:
        item["age_s"] = max(0, int(now - _epoch(item["stamp"])))
        item["in_use"] = _in_use(item, state, holder)
        names = pitr_directories(data_directory, item["stamp"])
        item["sockets"] = [] if item["kind"] == "kept" else sorted(
            glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(names["socket_prefix"]) + "*")))
        if item["in_use"]:
            item["advice"] = "in use, do not remove: the point-in-time recovery running now (%s) made it" % (
                describe_holder(holder))
            item["remove_command"] = None
        elif item["kind"] == "kept":
            item["advice"] = "remove once nothing in it is wanted"
            item["remove_command"] = remove_command([item["path"]])
        elif state == "unknown":
            item["advice"] = "remove only once no recovery of this cluster runs: %s" % holder
            item["remove_command"] = remove_command([item["path"]] + item["sockets"], "once no recovery runs")
        else:
            item["advice"] = "safe to remove: %s" % ("no recovery runs now" if state == "free" else
                                                     "the recovery running now (%s) started after it"
                                                     % describe_holder(holder))
            item["remove_command"] = remove_command([item["path"]] + item["sockets"], "no recovery uses it")
    return found, state, holder


def describe(item):
    size = human_bytes(item["size_bytes"]) if item["size_bytes"] is not None else item["size_note"]
    return "%s: %s, %s, %s old; %s" % (item["path"], KIND_TEXT[item["kind"]], size, human_age(item["age_s"]),
                                       item["advice"])


def leftovers_check(data_directory, estimate, margin, size_timeout, now=None):
    """The pgBackRest precheck's pitr_leftovers check (name, ok, observed, message, next) and the list.

    A warning (ok) except one case: copies no recovery uses would leave too little room for the next recovery's
    copy. That next recovery is this run's safety net, and removing them is safe: refused, with the numbers.
    """
    found, state, holder = list_leftovers(data_directory, size_timeout, now)
    room = room_beside(data_directory, estimate, margin)
    lock = {"path": lock_path(data_directory), "state": state}
    lock.update({"held": {"holder": holder}, "unknown": {"error": holder}}.get(state, {}))
    observed = dict(room, data_directory=data_directory, pitr_lock=lock)
    free, needed = room["free_bytes"], room["needed_bytes"]
    short = free is not None and free < needed
    numbers = room["text"]
    if not found:
        message = "nothing left by point-in-time recoveries beside %s; %s" % (data_directory, numbers)
        if short:
            message += ": TOO LITTLE ROOM for a recovery (it would refuse)"
        return {"name": "pitr_leftovers", "ok": True, "observed": observed, "message": message, "next": None}, found
    # Copies known to be of no running recovery: what the refusal asks to remove.
    removable = [d for d in found if d["kind"] != "kept" and not d["in_use"] and state != "unknown"]
    freed = sum(d["size_bytes"] or 0 for d in removable)
    kept = sum(d["size_bytes"] or 0 for d in found if d["kind"] == "kept")
    lines = ["%d director%s left by point-in-time recoveries beside %s:"
             % (len(found), "y" if len(found) == 1 else "ies", data_directory)]
    lines += ["           %s" % describe(d) for d in found]
    refuse = short and bool(removable)
    if not short:
        lines.append("           room for the next point-in-time recovery: %s" % numbers)
    elif refuse:
        lines.append("           TOO LITTLE ROOM for the next point-in-time recovery (this run's safety net): %s; "
                     "the copies no recovery uses hold %s%s" % (
                         numbers, human_bytes(freed), "" if free + freed >= needed else
                         ", and once they are removed the room is still short by %s" % human_bytes(needed - free - freed)))
    elif short:
        lines.append("           too little room for the next point-in-time recovery: %s; the kept directories hold "
                     "%s (the operator decides whether anything in them is wanted)" % (numbers, human_bytes(kept)))
    # The copies first: what a refusal asks for; then what the operator decides on.
    commands = [d["remove_command"] for d in sorted(found, key=lambda d: d["kind"] == "kept") if d["remove_command"]]
    return {"name": "pitr_leftovers", "ok": not refuse, "observed": observed, "message": "\n".join(lines),
            "next": ("remove what is not wanted (never done by this run):\n           %s"
                     % "\n           ".join(commands)) if commands else None}, found
