# -*- coding: utf-8 -*-
"""Action plugin for ledger_backup: in-process when it can, and the dump's progress while it runs.

The module runs in-process on the controller's own Python, else as a module (see
plugins/plugin_utils/ledger_inprocess.py). Either way it returns only once, at the end, and a dump
of a large database takes minutes: on a local connection the module runs in a thread and
writes a progress file every second; this plugin reads it and prints a line at least every
`progress_interval` seconds (default 10) in ansible-playbook's output:

    [staging-ledger] backup: dumping, 1.2 GiB written (compressed) of a 4.8 GiB database (25%), 40 s

Short dumps print nothing; neither do check mode and remote connections.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import tempfile
import threading
import time

from ansible.utils.display import Display

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
from ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_inprocess import LOCAL_TRANSPORTS, LedgerAction

display = Display()

# ledger-backup-progress-<worker pid>-<random>.json in the temporary directory: the pid says whose it is.
PROGRESS_PREFIX = "ledger-backup-progress-"


def new_progress_file():
    """A progress file of this worker's, after removing those left by killed runs (a SIGKILL leaves its file)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PROGRESS_PREFIX + "*.json*")):  # and .json.tmp
        owner = re.match(r"([0-9]{1,9})-", os.path.basename(path)[len(PROGRESS_PREFIX):])
        try:
            st = os.lstat(path)
        except OSError:
            continue
        # Only our own regular files (never another user's, nor a symlink), of a pid that is no process.
        if owner and stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not _alive(int(owner.group(1))):
            try:
                os.unlink(path)
            except OSError:
                pass
    fd, path = tempfile.mkstemp(prefix="%s%d-" % (PROGRESS_PREFIX, os.getpid()), suffix=".json")
    os.close(fd)
    return path


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def read_progress(progress_file):
    """What the module last wrote to its progress file ({} until it has written, or when unreadable)."""
    try:
        with open(progress_file) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def progress_line(host, progress_file, elapsed):
    """One progress line from the module's progress file (best effort)."""
    data = read_progress(progress_file)
    size = data.get("db_size") or 0
    written = data.get("bytes") or 0
    phase = data.get("phase", "starting")
    if phase == "dumping":
        share = " (%d%%)" % (100 * written / size) if size else ""
        detail = "%s written (compressed) of a %s database%s" % (human_bytes(written), human_bytes(size), share)
    else:
        detail = "dump of %s" % human_bytes(written)
    return "  [%s] backup: %s, %s, %d s" % (host, phase, detail, elapsed)


class ActionModule(LedgerAction):

    MODULE = "ledger_backup"
    # ledger_pgbackrest's action plugin reuses this one with its own line.
    progress_line = staticmethod(progress_line)

    def around(self, args, task_vars, execute):
        if self._task.check_mode or self._connection.transport not in LOCAL_TRANSPORTS:
            return execute(args)
        try:
            interval = float(args.get("progress_interval") or 10)
        except (TypeError, ValueError):
            return execute(args)  # the module's validation says what is wrong
        progress_file = new_progress_file()
        args = dict(args, progress_file=progress_file)
        host = task_vars.get("inventory_hostname", "?")
        outcome = {}

        def work():
            try:
                outcome["result"] = execute(args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the task's thread below
                outcome["error"] = exc

        started = time.time()
        worker = threading.Thread(target=work, name="ledger-backup-module", daemon=True)
        worker.start()
        try:
            while True:
                worker.join(interval)
                if not worker.is_alive():
                    break
                display.display(self.progress_line(host, progress_file, time.time() - started))
        finally:
            try:
                os.unlink(progress_file)
            except OSError:
                pass
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
