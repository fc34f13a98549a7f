"""The foundation's bad-input paths: each gives a clear message, never a traceback or a password."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import pgcluster
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def test_missing_binaries_as_non_root_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PG_BINDIR", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(pgcluster, "DEFAULT_BINDIR", str(tmp_path / "nor-here"))
    monkeypatch.setattr(pgcluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(pgcluster.os, "geteuid", lambda: 1000)
    with pytest.raises(pgcluster.ClusterError) as err:
        pgcluster.find_bindir()
    assert "apt-get install -y postgresql-15" in str(err.value) and "PG_BINDIR" in str(err.value)


def test_port_in_use_is_refused_with_the_variable_to_change(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "pgcluster.py"), "start", "--dir",
                              str(tmp_path / "pg"), "--port", str(port)], capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert f"port {port}" in res.stderr and "SANDBOX_PORT" in res.stderr and "Traceback" not in res.stderr


def test_starting_twice_is_harmless(pg_cluster):
    state = pgcluster.start(pg_cluster.base, pg_cluster.port, "ledger")
    assert state["port"] == pg_cluster.port
    with pg_cluster.connect("ledger") as conn, conn.cursor() as cur:
        cur.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'arrakis_app'")
        assert cur.fetchone() == (True,)
        cur.execute("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'arrakis_admin'")
        assert cur.fetchone() == (True,)


def _migrate_local(database_url, tmp_path):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1", DATABASE_URL=database_url,
               ANSIBLE_HOME=str(tmp_path / ".ansible"))
    res = subprocess.run([str(PLAYBOOK), "playbooks/migrate.yml", "-l", "local", "-e", f"backup_dir={tmp_path}/b",
                          "-e", f"migrations_dir={RUNBOOK_SET}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("url, expected", [
    ("postgresql://migrator:pa/ss@db.internal/ledger", "malformed"),
    ("postgresql://migrator:s3cr3t-pw@127.0.0.1:1/ledger", "cannot connect to migrator@127.0.0.1:1/ledger"),
])
def test_bad_database_url_names_the_target_never_the_password(url, expected, tmp_path):
    rc, out = _migrate_local(url, tmp_path)
    assert rc != 0
    assert expected in out, out[-2000:]
    assert "s3cr3t-pw" not in out and "pa/ss" not in out
    assert "Traceback" not in out


def test_the_sandbox_remembers_its_port_for_make_and_for_inventory_local(tmp_path):
    """`make migrate SANDBOX_PORT=56123`, then a bare `ansible-playbook ... -l local`: the same sandbox."""
    project = tmp_path / "project"
    (project / "inventory").mkdir(parents=True)
    shutil.copytree(ROOT / "inventory" / "local", project / "inventory" / "local")
    (project / ".sandbox").mkdir()
    (project / ".sandbox" / "cluster.json").write_text('{"port": 56123, "db": "ledger"}\n')
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_HOME=str(tmp_path / ".ansible"))
    for name in ("SANDBOX_PORT", "DATABASE_URL"):
        env.pop(name, None)

    def port_script(**extra):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "pgcluster.py"), "port", "--dir",
                              str(project / ".sandbox")], env=dict(env, **extra), capture_output=True, text=True,
                             check=True)
        return res.stdout.strip()

    def url(**extra):
        res = subprocess.run([str(PLAYBOOK.parent / "ansible"), "sandbox", "-i", str(project / "inventory" / "local"),
                              "-m", "ansible.builtin.debug", "-a", "var=database_url"],
                             cwd=ROOT, env=dict(env, **extra), capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    assert port_script() == "56123"                       # what the Makefile's SANDBOX_PORT defaults to
    assert "postgresql://postgres@127.0.0.1:56123/ledger" in url()
    assert port_script(SANDBOX_PORT="55999") == "55999"   # an explicit SANDBOX_PORT still wins
    assert "postgresql://postgres@127.0.0.1:55999/ledger" in url(SANDBOX_PORT="55999")
    (project / ".sandbox" / "cluster.json").unlink()
    assert port_script() == "55432" and "127.0.0.1:55432/ledger" in url()
