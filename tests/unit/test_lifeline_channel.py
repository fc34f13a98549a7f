"""ledger_lifeline's channel watch with real file descriptors: what a module on a database host reached over SSH
sees when the ssh client is gone (a pipe whose reader closed; a pty whose master closed), and what never counts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import _hung_up


@pytest.mark.parametrize("pair", [os.pipe, os.openpty], ids=["pipe whose reader closes", "pty whose master closes"])
def test_a_channel_hangs_up_when_its_other_end_closes(pair):
    other_end, watched = pair()  # (reader, writer) of a pipe; (master, slave) of a pty
    try:
        assert _hung_up(watched, 0) is False
        os.close(other_end)
        assert _hung_up(watched, 0) is True
    finally:
        os.close(watched)


def test_a_file_never_hangs_up(tmp_path):
    with open(tmp_path / "out", "w") as fh, open(os.devnull, "w") as null:
        assert _hung_up(fh.fileno(), 0.05) is False and _hung_up(null.fileno(), 0.05) is False


def test_an_armed_lifeline_dies_when_its_channel_hangs_up_and_not_once_disarmed():
    """A process whose standard output is a pipe: closing the reader kills it (SIGKILL) while armed; disarmed
    (the swap), it runs on and parent_alive() says False."""
    script = textwrap.dedent("""
        import sys, time
        from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import Lifeline
        life = Lifeline(channel=True).die_with_parent()
        if sys.argv[1] == "disarmed":
            life.disarm()
        sys.stderr.write("ready\\n"); sys.stderr.flush()
        if sys.argv[1] == "armed":
            time.sleep(60)  # killed by the watch long before
        for _ in range(200):
            if not life.parent_alive():
                sys.stderr.write("gone\\n"); sys.stderr.flush()
                sys.exit(3)
            time.sleep(0.05)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for mode, returncode in (("armed", -9), ("disarmed", 3)):
        proc = subprocess.Popen([sys.executable, "-c", script, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True)
        assert proc.stderr.readline() == "ready\n"
        proc.stdout.close()  # the ssh client is gone
        assert proc.wait(timeout=30) == returncode, proc.stderr.read()
        proc.stderr.close()
