# -*- coding: utf-8 -*-
"""Whether a backup directory is usable, and making it: free space, mode 0700, writable for real.

Read by the precheck (before anything is written) and by the backup and pgBackRest stages
(which create it 0700, parents too, when missing).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes


def _nearest_existing(path):
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def check_backup_dir(path, needed_bytes=None):
    """Read-only checks of a backup directory. Returns a dict, never creates anything.

    {exists, would_create, mode, writable, free_bytes, needed_bytes, problems: [..]}
    Missing is not a problem by itself when its nearest existing parent is a
    writable directory: the directory is then created 0700.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    out = {"path": path, "exists": os.path.isdir(path), "would_create": False, "mode": None,
           "writable": False, "free_bytes": None, "needed_bytes": needed_bytes, "problems": []}
    if os.path.exists(path) and not os.path.isdir(path):
        out["problems"].append("%s exists and is not a directory" % path)
        return out
    if out["exists"]:
        st = os.stat(path)
        out["mode"] = "%04o" % stat.S_IMODE(st.st_mode)
        if st.st_mode & 0o007:
            out["problems"].append("%s is mode %s: others can read or enter it (backups hold every row); "
                                   "run 'chmod 0700 %s'" % (path, out["mode"], path))
        out["writable"] = _really_writable(path)
        if not out["writable"]:
            out["problems"].append("%s is not writable by %s (uid %d): fix its owner or mode"
                                   % (path, _whoami(), os.geteuid()))
        probe = path
    else:
        parent = _nearest_existing(path)
        out["would_create"] = True
        out["writable"] = os.path.isdir(parent) and _really_writable(parent)
        if not out["writable"]:
            out["problems"].append("%s does not exist and cannot be created: %s is not a writable directory"
                                   % (path, parent))
        probe = parent
    try:
        out["free_bytes"] = shutil.disk_usage(probe).free
    except OSError as exc:
        out["problems"].append("cannot read free space of %s: %s" % (probe, exc))
    if needed_bytes is not None and out["free_bytes"] is not None and out["free_bytes"] < needed_bytes:
        out["problems"].append("%s has %s free, the backup needs about %s" % (
            probe, human_bytes(out["free_bytes"]), human_bytes(needed_bytes)))
    return out


def _whoami():
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # pragma: no cover
        return str(os.geteuid())


def _really_writable(path):
    """os.access says yes to root on a read-only mount; try to create a file instead."""
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ledger-write-probe-", dir=path)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def ensure_backup_dir(path):
    """Create the directory 0700 (parents too) if missing; return True when created."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        return False
    # os.makedirs gives `mode` to the leaf only; parents it creates (backups/ of
    # backups/local) must not be world-readable either.
    missing = []
    probe = path
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for directory in reversed(missing):
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)
    return True
