"""Stopping `ansible-playbook playbooks/rollback.yml -e rollback_mode=restore` (issue 17, point 6).

The real thing: the playbook in its own process group against the session's PostgreSQL 15, stopped
with SIGKILL, SIGTERM or SIGINT (Ctrl-C) of the whole group while its restore waits inside the swap.
The kill point is deterministic: a transaction holds the target's pg_database row FOR UPDATE (the
swap's first RENAME updates it), and the test waits until pg_stat_activity shows the RENAME waiting
on it. Ansible's worker runs in a session of its own, so the group's signal misses it; it must die
with the playbook anyway, and the next run must find a target that accepts connections, holds its
data, and a leftover it names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pghelpers import history, q
from test_rollback_faults import SwapBlocker, accepts_connections
from test_rollback_restore import MIGRATIONS, backup, databases, record_history, revert_0011

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
SEED = "SELECT count(*) FROM public.credit_lots WHERE source = 'seed'"


def descendants(pid):
    """(pid, start time) of every process below ``pid`` (a worker that called setsid() included)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc/%s/stat" % entry).read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def alive(proc):
    pid, started = proc
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] == started and fields[0] != "Z"


class Target(object):
    def __init__(self, tmp_path, url, cluster):
        self.tmp, self.url, self.cluster = tmp_path, url, cluster
        self.name = url.rsplit("/", 1)[1]
        self.inventory = tmp_path / "inventory.yml"
        self.inventory.write_text("all:\n  hosts:\n    rbdb:\n      database_url: %s\n      backup_dir: %s\n"
                                  % (url, tmp_path / "backups"))

    def command(self, *args, playbook="rollback.yml"):
        return [str(PLAYBOOK), "-i", str(self.inventory), "-l", "rbdb", "playbooks/%s" % playbook,
                "-e", "migrations_dir=%s" % MIGRATIONS, "-e", "report_dir=%s" % (self.tmp / "reports"), *args]

    def env(self):
        env = dict(os.environ, ANSIBLE_VERBOSITY="1", ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
                   ANSIBLE_HOME=str(self.tmp / ".ansible"), ANSIBLE_NOCOLOR="1",
                   PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("DATABASE_URL", None)
        return env

    def run(self, *args, playbook="rollback.yml"):
        res = subprocess.run(self.command(*args, playbook=playbook), cwd=ROOT, env=self.env(), capture_output=True, text=True,
                             timeout=300, check=False)
        return res.returncode, " ".join((res.stdout + res.stderr).split())


@pytest.fixture
def target(tmp_path, ledger_db, pg_cluster):
    """A target at 0011 with one row, a verified backup of it, then 0011 reverted (the backup differs)."""
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_engine import load_migration_set
    record_history(ledger_db)
    for m in load_migration_set(str(MIGRATIONS)):  # the history as the engine records it: no drift
        q(ledger_db, "UPDATE migrations.history SET name = %s, checksum = %s WHERE version = %s",
          (m.name, m.checksum, m.version))
    q(ledger_db, "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                 " VALUES ('11111111-1111-1111-1111-111111111111', 'seed', 1000000)")
    backup.run_backup({"database_url": ledger_db, "backup_dir": str(tmp_path / "backups"), "retention": 0,
                       "run_id": "test-backup"})
    revert_0011(ledger_db)
    t = Target(tmp_path, ledger_db, pg_cluster)
    try:
        yield t
    finally:
        for name in databases(pg_cluster, t.name + "\\_%restore\\_%"):
            pg_cluster.drop_db(name)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_stopping_the_playbook_during_a_restore_leaves_a_usable_target_and_the_next_run_says_so(target, sig):
    before = history(target.url)
    assert before == ["0008", "0009", "0010"]
    blocker = SwapBlocker(target.cluster, target.name)
    # The short TTL and swap timeout only shorten what a dead run leaves behind for the test's sake.
    proc = subprocess.Popen(target.command("-e", "rollback_mode=restore", "-e", "rollback_lock_ttl=2",
                                           "-e", "rollback_swap_timeout=1"),
                            cwd=ROOT, env=target.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        backend = blocker.wait_for_swap(240, gone=lambda: proc.poll() is not None and proc.communicate()[0][-3000:])
        tree = descendants(proc.pid)
        assert tree, "the playbook has no worker"
        os.killpg(proc.pid, sig)
        output = proc.communicate(timeout=60)[0]
        # Not one process of the playbook's tree outlives it (the worker in its own session, pg_restore).
        deadline = time.time() + 30
        while [p for p in tree if alive(p)]:
            assert time.time() < deadline, "left running after %s: %s" % (sig.name, [p for p in tree if alive(p)])
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        blocker.release()
    assert proc.returncode != 0, output
    # The swap's transaction dies with its client: the server rolls it back once its RENAME got the row.
    deadline = time.time() + 30
    while q(target.cluster.url(), "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,))[0][0]:
        assert time.time() < deadline, "the killed swap's backend lingers"
        time.sleep(0.05)
    # The target accepts connections and holds its data: as before (never neither; never half-swapped).
    assert accepts_connections(target.cluster, target.name) is True
    assert history(target.url) == before
    assert q(target.url, SEED)[0][0] == 1
    scratch = databases(target.cluster, target.name + "\\_restore\\_%")
    assert len(scratch) == 1 and databases(target.cluster, target.name + "\\_pre\\_restore\\_%") == []

    # The killed run's lease stays until it expires (the next restore or migrate waits for it, saying so).
    (run_id, holder), = q(target.url, "SELECT run_id, holder FROM migrations.lock")
    assert holder.startswith("restore by ")

    # The next run's precheck says what it found: the scratch copy the interrupted restore left (with
    # its size and age, and the command that drops it: tested in test_rollback_playbook.py) and the
    # lease the killed run still holds.
    rc, out = target.run(playbook="precheck.yml")
    assert rc == 0, out
    assert "left by earlier restores: %s (scratch copy of a restore that did not finish" % scratch[0] in out, out
    assert "the scratch copies are of restores that were interrupted" in out
    assert "rollback_drop_leftovers=true" in out and "rollback_drop_kept" not in out
    assert "the run lease of %s is held by run %s (%s)" % (target.name, run_id, holder) in out
    assert history(target.url) == before and q(target.url, SEED)[0][0] == 1
