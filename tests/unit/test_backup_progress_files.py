"""The backup progress files of the action plugin: a run killed with SIGKILL can't remove its own; the next one
removes those whose worker is gone, and never a live run's."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from ansible_collections.arrakis.ledger.plugins.action.ledger_backup import PROGRESS_PREFIX, new_progress_file


def test_a_new_progress_file_removes_those_of_dead_workers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a worker that was SIGKILLed: its pid is no process now
    dead = tmp_path / ("%s%d-abcd1234.json" % (PROGRESS_PREFIX, gone.pid))
    live = tmp_path / ("%s%d-efgh5678.json" % (PROGRESS_PREFIX, os.getppid()))  # a run still going
    dead_tmp = tmp_path / (dead.name + ".tmp")  # the module's half-written one
    other = tmp_path / "unrelated.json"
    odd = tmp_path / ("%s99999999999999999999-x.json" % PROGRESS_PREFIX)  # anyone may put one there
    for path in (dead, dead_tmp, live, other, odd):
        path.write_text("{}")
    link = tmp_path / ("%s%d-link.json" % (PROGRESS_PREFIX, gone.pid))
    link.symlink_to(other)  # never followed nor removed
    mine = new_progress_file()
    assert os.path.basename(mine).startswith("%s%d-" % (PROGRESS_PREFIX, os.getpid()))
    assert not dead.exists() and not dead_tmp.exists() and os.path.exists(mine)
    assert live.exists() and other.exists() and odd.exists() and link.is_symlink()
