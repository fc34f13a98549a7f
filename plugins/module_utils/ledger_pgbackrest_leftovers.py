# -*- coding: utf-8 -*-
"""Data directories a point-in-time recovery leaves beside the cluster's: one home for their names, the room a
recovery needs, and what the precheck says about them.

A PITR (ledger_pgbackrest_pitr.py) restores into ``<data>.pitr_<stamp>`` (with its socket and recovery.log in
``<tmp>/ledger-pitr-<stamp>-*``), and at the swap keeps the data directory as it was as ``<data>.pre_pitr_<stamp>``;
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
# The size of the cluster a recovery copies: what the PITR's room is measured against.
CLUSTER_SIZE_SQL = "(SELECT sum(pg_database_size(oid)) FROM pg_database)::bigint"

KIND_TEXT = {
    "interrupted": "the copy of a point-in-time recovery that was interrupted (killed before its swap)",
    "failed": "the recovered copy that did not start as the target (the swap was undone)",
    "kept": "the cluster as it was before a finished point-in-time recovery (rows written after its restore "
            "point live only here)",
}


def pitr_directories(data_directory, stamp):
    """{copy, kept, failed, socket_prefix}: the paths one PITR stamped `stamp` creates (the only place they are named)."""
    base = data_directory.rstrip("/")
    copy = base + COPY + stamp
    return {"copy": copy, "kept": base + KEPT + stamp, "failed": copy + FAILED,
            "socket_prefix": SOCKET_PREFIX + stamp + "-"}


def remove_command(paths, why="once nothing in it is wanted"):
    """What the operator runs (never this code): rm -rf of the paths, as root on the database host."""
    return "rm -rf %s   # as root on the database host, %s" % (" ".join(shlex.quote(p) for p in paths), why)


def room_beside(data_directory, cluster_size, margin):
    """{path, free_bytes, needed_bytes}: the room a recovery's copy needs beside the data directory (cluster size x
    margin) and what the file system has (free_bytes None when it cannot be read)."""
    parent = os.path.dirname(data_directory.rstrip("/"))
    try:
        st = os.statvfs(parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    return {"path": parent, "free_bytes": free, "needed_bytes": int((cluster_size or 0) * margin)}


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


def leftovers_check(data_directory, cluster_size, margin, size_timeout, now=None):
    """The pgBackRest precheck's pitr_leftovers check (name, ok, observed, message, next) and the list.

    A warning (ok) except one case: copies no recovery uses would leave too little room for the next recovery's
    copy. That next recovery is this run's safety net, and removing them is safe: refused, with the numbers.
    """
    found, state, holder = list_leftovers(data_directory, size_timeout, now)
    room = room_beside(data_directory, cluster_size, margin)
    lock = {"path": lock_path(data_directory), "state": state}
    lock.update({"held": {"holder": holder}, "unknown": {"error": holder}}.get(state, {}))
    observed = dict(room, data_directory=data_directory, cluster_size_bytes=cluster_size, space_margin=margin,
                    pitr_lock=lock)
    free, needed = room["free_bytes"], room["needed_bytes"]
    short = free is not None and free < needed
    numbers = ("%s free in %s; the next recovery's copy needs %s (the cluster's %s x the margin %s)"
               % (human_bytes(free), room["path"], human_bytes(needed), human_bytes(cluster_size), margin))
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
