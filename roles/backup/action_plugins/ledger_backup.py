# -*- coding: utf-8 -*-
"""Action plugin for ledger_backup: shows the dump's progress while the module runs.

A module returns only once, at the end; a dump of a large database takes minutes.
This plugin runs the module as usual and, meanwhile, reads the progress file the
module writes every second and prints a line at least every `progress_interval`
seconds (default 10) in ansible-playbook's output:

    [staging-ledger] backup: dumping, 1.2 GiB written (compressed) of a 4.8 GiB database (25%), 40 s

Short dumps print nothing. Progress needs the module to run on the controller
(ansible_connection local, the project's default); elsewhere the module simply
runs without it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.vars import merge_hash

display = Display()


def _human(num):
    num = float(num or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num < 1024 or unit == "TiB":
            return "%.1f %s" % (num, unit) if unit != "B" else "%d B" % num
        num /= 1024.0
    return "%.1f TiB" % num


class ActionModule(ActionBase):

    _supports_check_mode = True
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp
        task_vars = task_vars or {}
        args = dict(self._task.args)
        interval = float(args.pop("progress_interval", 10) or 10)
        local = self._connection.transport in ("local", "ansible.builtin.local")
        wrap_async = self._task.async_val and not self._connection.has_native_async
        if not local or wrap_async or self._task.check_mode:
            result = merge_hash(result, self._execute_module(module_name="ledger_backup", module_args=args,
                                                             task_vars=task_vars, wrap_async=wrap_async))
            if not wrap_async:
                self._remove_tmp_path(self._connection._shell.tmpdir)
            return result

        fd, progress_file = tempfile.mkstemp(prefix="ledger-backup-progress-", suffix=".json")
        os.close(fd)
        args["progress_file"] = progress_file
        host = task_vars.get("inventory_hostname", "?")
        stop = threading.Event()
        started = time.time()

        def report():
            while not stop.wait(interval):
                try:
                    with open(progress_file) as fh:
                        data = json.load(fh)
                except (OSError, ValueError):
                    data = {}
                size = data.get("db_size") or 0
                written = data.get("bytes") or 0
                phase = data.get("phase", "starting")
                if phase == "dumping":
                    share = " (%d%%)" % (100 * written / size) if size else ""
                    detail = "%s written (compressed) of a %s database%s" % (_human(written), _human(size), share)
                else:
                    detail = "dump of %s" % _human(written)
                display.display("  [%s] backup: %s, %s, %d s" % (host, phase, detail, time.time() - started))

        thread = threading.Thread(target=report, name="ledger-backup-progress", daemon=True)
        thread.start()
        try:
            result = merge_hash(result, self._execute_module(module_name="ledger_backup", module_args=args,
                                                             task_vars=task_vars))
        finally:
            stop.set()
            thread.join(5)
            try:
                os.unlink(progress_file)
            except OSError:
                pass
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result
