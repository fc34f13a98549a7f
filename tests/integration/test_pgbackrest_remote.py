"""backup_method=pgbackrest on a database host reached over SSH, with become to the cluster's OS user.

Production runs pgBackRest on the database server: the target names it (pgbackrest_host) and the
pgBackRest tasks are delegated there. Here that host is a real OpenSSH server of the test's own
(scripts/sshd_ctl.py: loopback, a free port, its own host key, one throwaway authorized key),
reached as root with `become` (su) to postgres, running the module with the host's
/usr/bin/python3 (Debian's python3-psycopg2), while database_url reaches PostgreSQL directly.
The backup stage and the PITR rollback run through it with the real playbooks. One sshd and one
archiving cluster for the module.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import archiving_cluster
from pghelpers import history, q
from test_pgbackrest import clean_up_killed, kill_before_the_swap

import pgcluster
import sshd_ctl

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

pytestmark = [
    pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgbackrest is not installed (make pytest installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the pgbackrest remote path test becomes postgres over ssh as root"),
    pytest.mark.skipif(bool(sshd_ctl.missing()), reason="the pgbackrest remote path needs %s (make pytest installs "
                       "them as root)" % ", ".join(sshd_ctl.missing())),
]


@pytest.fixture(scope="module")
def remote():
    """An archiving cluster at 0011, an sshd in front of this host, and an inventory that uses both."""
    with archiving_cluster("ledger-pgbackrest-remote-", "remote") as (base, state):
        yield from _behind_sshd(base, state)


def _behind_sshd(base, state):
    """The remote fixture's environment: a probe table, a backup directory of the cluster's OS user, a private
    sshd on a free port and the inventory that reaches the database host through it (stopped afterwards)."""
    url = state["url"]
    q(url, "CREATE TABLE public.remote_probe (id int PRIMARY KEY)")
    q(url, "INSERT INTO public.remote_probe SELECT generate_series(1, 50)")
    owner = pwd.getpwnam(state["os_user"])
    # The module runs there as postgres: it writes the manifests, so the backup directory is its.
    backups = Path(tempfile.mkdtemp(prefix="ledger-remote-backups-", dir="/var/tmp"))
    os.chown(backups, owner.pw_uid, owner.pw_gid)
    ssh_dir = base / "ssh"
    ssh_dir.mkdir()
    client_key = sshd_ctl.keypair(ssh_dir / "client_ed25519")
    port = pgcluster.free_port()
    sshd = sshd_ctl.start(ssh_dir / "server", port, Path(str(client_key) + ".pub"))
    inventory = base / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {
        "pitrdb": {"database_url": url, "backup_dir": str(backups), "backup_method": "pgbackrest",
                   "pgbackrest_stanza": "remote", "pgbackrest_config": state["pgbackrest"]["config"],
                   "pgbackrest_host": "dbhost", "pgbackrest_become": True, "pgbackrest_os_user": owner.pw_name,
                   "pgbackrest_backup_type": "incr"},
        # The database server as Ansible reaches it in production: SSH, then become the cluster's OS user.
        "dbhost": {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": port,
                   "ansible_user": "root", "ansible_ssh_private_key_file": str(client_key),
                   "ansible_ssh_common_args": "-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes"
                                              % sshd["known_hosts"],
                   # No multiplexing master left behind after the test (ssh's ControlPersist).
                   "ansible_ssh_args": "-o ControlMaster=no -o ControlPath=none",
                   "ansible_python_interpreter": "/usr/bin/python3", "ansible_become_method": "su"},
    }}}))
    try:
        yield {"url": url, "inventory": inventory, "backups": backups, "owner": owner, "base": base,
               "sshd": sshd["pid"]}
    finally:
        sshd_ctl.stop(ssh_dir / "server")
        shutil.rmtree(backups, ignore_errors=True)


def command(remote, playbook, *args):
    """The ansible-playbook command line against the remote inventory, and its environment."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(remote["base"] / ".ansible"),
               ANSIBLE_NOCOLOR="1", PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))
    return [str(PLAYBOOK), "-i", str(remote["inventory"]), str(ROOT / "playbooks" / playbook), "-l", "pitrdb",
            *args], env


def run(remote, playbook, *args):
    cmd, env = command(remote, playbook, *args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)


def test_backup_stage_and_pitr_through_ssh_as_the_clusters_os_user(remote):
    out = run(remote, "backup.yml", "-vvv")
    assert out.returncode == 0, out.stdout[-4000:]
    # Really over SSH, as root, then su to postgres, with the host's own Python.
    assert "ESTABLISH SSH CONNECTION FOR USER: root" in out.stdout
    assert "/usr/bin/python3" in out.stdout
    text = " ".join(out.stdout.split())
    assert "restore point ledger-" in text and "on incr backup" in text
    manifests = sorted(remote["backups"].glob("*.pitr.json"))
    assert len(manifests) == 1
    assert os.stat(manifests[0]).st_uid == remote["owner"].pw_uid  # written by the module as postgres
    actor = q(remote["url"], "SELECT actor FROM migrations.events WHERE action = 'backup' AND outcome = 'ok'")
    assert actor and actor[0][0].startswith(remote["owner"].pw_name + "@")

    q(remote["url"], "INSERT INTO public.remote_probe SELECT generate_series(51, 60)")
    out = run(remote, "rollback.yml", "-e", "rollback_mode=restore")
    assert out.returncode != 0 and "rollback_allow_data_loss=true" in out.stdout, out.stdout[-3000:]
    out = run(remote, "rollback.yml", "-e", "rollback_mode=restore", "-e", "rollback_allow_data_loss=true")
    assert out.returncode == 0, out.stdout[-4000:]
    assert "recovered postgres@" in " ".join(out.stdout.split())
    assert q(remote["url"], "SELECT count(*) FROM public.remote_probe")[0][0] == 50
    assert history(remote["url"]) == json.loads(manifests[0].read_text())["applied"]
    assert q(remote["url"], "SELECT outcome, actor LIKE %s FROM migrations.events WHERE action = 'restore'",
             (remote["owner"].pw_name + "@%",)) == [("ok", True)]
    assert q(remote["url"], "SELECT count(*) FROM migrations.lock")[0][0] == 0
    data_dir = q(remote["url"], "SHOW data_directory")[0][0]
    kept = sorted(Path(data_dir).parent.glob(Path(data_dir).name + ".pre_pitr_*"))
    assert len(kept) == 1
    # The precheck's pgBackRest task, through the same SSH and become, lists it as the cluster's OS user sees it.
    out = run(remote, "precheck.yml", "--tags", "precheck_pgbackrest")
    text = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stdout[-4000:]
    assert "pitr_leftovers: 1 directory left by point-in-time recoveries beside %s" % data_dir in text, text[-3000:]
    assert "rm -rf %s # as root on the database host, once nothing in it is wanted" % kept[0] in text
    for path in kept:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_playbook_stops_the_remote_pitr_before_the_swap(remote, sig):
    """The PITR on the database host, reached over SSH, waits to park its lease right before the swap (the
    test holds the lease row); the playbook's process group is killed. Ansible's worker (its own session)
    kills itself and its ssh client (SIGKILL: it watches ansible-playbook; SIGTERM: Ansible's own handler),
    the module on the database host sees its channel hang up and dies, its copy server with it: no process
    of either side is left, and the target is not swapped once the lease row is free again."""
    import psycopg2
    out = run(remote, "backup.yml")
    assert out.returncode == 0, out.stdout[-3000:]
    manifest = max(remote["backups"].glob("*.pitr.json"), key=os.path.getmtime)
    url = remote["url"]
    data_dir = q(url, "SHOW data_directory")[0][0]
    kept = sorted(glob.glob(data_dir + ".pre_pitr_*"))
    q(url, "INSERT INTO public.remote_probe SELECT max(id) + 1 FROM public.remote_probe")  # after the backup
    rows = q(url, "SELECT count(*) FROM public.remote_probe")[0][0]
    cmd, env = command(remote, "rollback.yml", "-e", "rollback_mode=restore", "-e", "rollback_allow_data_loss=true",
                       "-e", "backup_file=%s" % manifest, "-e", "rollback_lock_ttl=600",
                       "-e", "rollback_run_id=pitr-killed")
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    hold = psycopg2.connect(url)
    try:
        kill_before_the_swap(proc, hold, url, data_dir, sig, hosts=[remote["sshd"]])
        hold.close()  # the lease row is free: a recovery still alive would swap now
        assert q(url, "SELECT run_id FROM migrations.lock") == [("pitr-killed",)]
        assert q(url, "SHOW data_directory")[0][0] == data_dir
        assert q(url, "SELECT count(*) FROM public.remote_probe")[0][0] == rows
        assert sorted(glob.glob(data_dir + ".pre_pitr_*")) == kept and len(glob.glob(data_dir + ".pitr_*")) == 1
        assert q(url, "SELECT count(*) FROM migrations.events WHERE run_id = 'pitr-killed' AND action = 'restore'"
                      " AND outcome = 'ok'") == [(0,)]
    finally:
        clean_up_killed(proc, hold, url, data_dir)
