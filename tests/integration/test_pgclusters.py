"""The sweep of clusters left by killed test runs (tests/integration/pgclusters.py): a dead
process's cluster is stopped and removed, a live process's cluster is never touched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pgcluster
import pgclusters

TESTS = Path(__file__).resolve().parent
# A test run in miniature: a process that starts a registered cluster, reports it, then waits to be killed.
OWNER = textwrap.dedent(f"""
    import json, sys, tempfile, time
    from pathlib import Path
    sys.path[:0] = [{str(TESTS.parents[1] / "scripts")!r}, {str(TESTS)!r}]
    import pgclusters
    tmpdir = Path(tempfile.mkdtemp(prefix="ledger-pytest-"))
    print(json.dumps(pgclusters.start(tmpdir / "pg", tmpdir=tmpdir)), flush=True)
    time.sleep(600)
""")


def test_a_killed_runs_cluster_is_swept_and_a_live_ones_is_not():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        state = json.loads(owner.stdout.readline())
        base, home = Path(state["dir"]), Path(state["home"])
        assert pgcluster.is_running(base)
        assert state["dir"] not in pgclusters.sweep()  # its owner is alive
        assert pgcluster.is_running(base)
        owner.send_signal(signal.SIGKILL)  # no finalizer runs, as when CI kills a run
        owner.wait(timeout=30)
        assert pgcluster.is_running(base)  # left behind
        assert state["dir"] in pgclusters.sweep()
        assert not pgcluster.is_running(base)
        assert not home.exists() and not base.parent.exists()
        assert not pgclusters._entry(base).exists()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=30)
        pgclusters.sweep()  # whatever failed above, nothing is left running
