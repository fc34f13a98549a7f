"""scripts/debian_packages.py: packages install with their services held, and the machine's own policy-rc.d
is never touched (the policy file's path is a temporary one here; the real one is /usr/sbin/policy-rc.d)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ledgertest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import debian_packages  # noqa: E402  (a script beside the others, standard library only)


def test_a_deny_all_policy_is_in_place_while_packages_install_and_gone_after(tmp_path):
    policy = tmp_path / "policy-rc.d"
    with debian_packages.services_held(policy) as ours:
        assert ours is True
        # What invoke-rc.d and deb-systemd-invoke run before starting a service: 101 is "forbidden".
        assert subprocess.run([str(policy), "ssh", "start"], check=False).returncode == 101
    assert not policy.exists()


def test_the_policy_goes_also_when_the_install_fails(tmp_path):
    policy = tmp_path / "policy-rc.d"
    with pytest.raises(RuntimeError):
        with debian_packages.services_held(policy):
            raise RuntimeError("apt-get failed")
    assert not policy.exists()


def test_the_machines_own_policy_is_left_alone(tmp_path):
    policy = tmp_path / "policy-rc.d"
    own = "#!/bin/sh\n# a container's\nexit 101\n"
    policy.write_text(own)
    with debian_packages.services_held(policy) as ours:
        assert ours is False and policy.read_text() == own
    assert policy.read_text() == own


def test_a_policy_left_by_a_killed_install_is_ours_and_removed(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text(debian_packages.POLICY)
    with debian_packages.services_held(policy) as ours:
        assert ours is True
    assert not policy.exists()


def test_without_apt_get_it_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on this PATH
    assert debian_packages.main(["install", "pgbouncer", "openssh-server"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: missing pgbouncer openssh-server: install them as root: apt-get update && "
                   "apt-get install -y pgbouncer openssh-server\n")
