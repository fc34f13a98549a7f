"""scripts/debian_packages.py: packages install with their services held, and the machine's own policy-rc.d
is never touched (the policy file's path is a temporary one here; the real one is /usr/sbin/policy-rc.d)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest
from ledgertest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import debian_packages  # noqa: E402  (a script beside the others, standard library only)


def test_a_deny_all_policy_is_in_place_while_packages_install_and_gone_after(tmp_path):
    policy = tmp_path / "policy-rc.d"
    with debian_packages.services_held(policy, tmp_path / "lock") as ours:
        assert ours is True
        # What invoke-rc.d and deb-systemd-invoke run before starting a service: 101 is "forbidden".
        assert subprocess.run([str(policy), "ssh", "start"], check=False).returncode == 101
    assert not policy.exists()


def test_the_policy_goes_also_when_the_install_fails(tmp_path):
    policy = tmp_path / "policy-rc.d"
    with pytest.raises(RuntimeError):
        with debian_packages.services_held(policy, tmp_path / "lock"):
            raise RuntimeError("apt-get failed")
    assert not policy.exists()


def test_the_machines_own_policy_is_left_alone(tmp_path):
    policy = tmp_path / "policy-rc.d"
    own = "#!/bin/sh\n# a container's\nexit 101\n"
    policy.write_text(own)
    with debian_packages.services_held(policy, tmp_path / "lock") as ours:
        assert ours is False and policy.read_text() == own
    assert policy.read_text() == own


def test_a_policy_left_by_a_killed_install_is_ours_and_removed(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text(debian_packages.POLICY)
    with debian_packages.services_held(policy, tmp_path / "lock") as ours:
        assert ours is True
    assert not policy.exists()


def test_a_symlinked_policy_is_the_machines_even_dangling(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.symlink_to(tmp_path / "alternatives" / "policy-rc.d")  # dangling: exists() would say False
    with debian_packages.services_held(policy, tmp_path / "lock") as ours:
        assert ours is False
    assert policy.is_symlink() and not policy.exists()


def test_a_sigterm_during_the_install_ends_its_process_group_then_removes_the_policy(tmp_path):
    """A CI timeout's SIGTERM while "apt-get" runs (here a shell with a child of its own, as dpkg is apt-get's):
    the whole group ends first, then the policy goes, and the process exits 128 + 15."""
    policy = tmp_path / "policy-rc.d"
    script = ("import os, sys; sys.path.insert(0, %r); import debian_packages\n"
              "from pathlib import Path\n"
              "with debian_packages.services_held(Path(%r), Path(%r)):\n"
              "    debian_packages._run(['sh', '-c', 'echo $$; sleep 60 & wait'], dict(os.environ))\n"
              % (str(ROOT / "scripts"), str(policy), str(tmp_path / "lock")))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    group = int(proc.stderr.readline())  # the shell's pid: its group's id (a session of its own)
    assert policy.exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 128 + 15
    assert not os.path.lexists(policy) and not debian_packages._group_alive(group)
    proc.stderr.close()


def test_without_apt_get_it_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on this PATH
    assert debian_packages.main(["install", "pgbouncer", "openssh-server"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: missing pgbouncer openssh-server: install them as root: apt-get update && "
                   "apt-get install -y pgbouncer openssh-server\n")


def test_a_second_install_waits_for_the_first_and_keeps_its_own_policy(tmp_path):
    """Two at once would remove each other's policy while the other's apt-get runs: the second waits."""
    policy, lock = tmp_path / "policy-rc.d", tmp_path / "lock"
    script = ("import os, sys; sys.path.insert(0, %r); import debian_packages\n"
              "from pathlib import Path\n"
              "with debian_packages.services_held(Path(%r), Path(%r)) as ours:\n"
              "    print(ours, os.path.exists(%r), flush=True)\n"
              % (str(ROOT / "scripts"), str(policy), str(lock), str(policy)))
    with debian_packages.services_held(policy, lock):
        second = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        # It can't get in while this one holds the lock, however long it is given.
        assert select.select([second.stdout], [], [], 1.0)[0] == []
        assert policy.exists()
    out, _err = second.communicate(timeout=30)
    assert out == "True True\n" and not os.path.lexists(policy)
