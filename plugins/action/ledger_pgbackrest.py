# -*- coding: utf-8 -*-
"""Action plugin for ledger_pgbackrest: in-process when it can, and progress lines while it runs.

A pgBackRest backup of a large cluster, or a point-in-time recovery, takes minutes. The
threading and the progress file are ledger_backup's (arrakis.ledger's ledger_backup action); only
the line differs: the module writes its phase and pgbackrest's percentage of files copied,
printed every `progress_interval` seconds on a local connection:

    [ledger-db1] pgbackrest: pgbackrest incr backup, 42% of the files, 30 s
"""

from __future__ import annotations

import os

from ansible_collections.arrakis.ledger.plugins.action.ledger_backup import ActionModule as BackupAction, read_progress
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import die_with_playbook
from ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_inprocess import LOCAL_TRANSPORTS


def progress_line(host, progress_file, elapsed):
    data = read_progress(progress_file)
    percent = data.get("percent")
    share = ", %d%% of the files" % percent if isinstance(percent, (int, float)) else ""
    return "  [%s] pgbackrest: %s%s, %d s" % (host, data.get("phase", "starting"), share, elapsed)


class ActionModule(BackupAction):

    MODULE = "ledger_pgbackrest"
    progress_line = staticmethod(progress_line)

    def around(self, args, task_vars, execute):
        # A recovery dies with the playbook up to its swap (ledger_lifeline): run as a module, its parent is a
        # shell under Ansible's worker, which outlives a killed playbook; so it watches ansible-playbook itself
        # (this worker's parent), which it can only do on this host. On a remote host it watches its SSH
        # channel instead, and this worker kills itself and its ssh client once ansible-playbook is gone.
        if args.get("action") != "restore" or self._task.check_mode:
            return super().around(args, task_vars, execute)
        if self._connection.transport in LOCAL_TRANSPORTS:
            return super().around(dict(args, playbook_pid=os.getppid()), task_vars, execute)
        watching = die_with_playbook(os.getppid())
        try:
            return super().around(dict(args, watch_channel=True), task_vars, execute)
        finally:
            watching.set()
