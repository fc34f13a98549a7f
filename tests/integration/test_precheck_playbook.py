"""precheck.yml, and the precheck and backup stages together, through ansible-playbook.

A user's own inventory (`-i`) whose host sets only `database_url`, narrowed with `-l`: the roles'
defaults do the rest. Each run is a real ansible-playbook process against the session's PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg2

from test_precheck import MIGRATIONS, _record_applied, events, schema_exists

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def inventory(tmp_path, url, **host_vars):
    lines = ["all:", "  hosts:", "    mydb:", f"      database_url: {url}"]
    lines += [f"      {k}: {v}" for k, v in host_vars.items()]
    path = tmp_path / "inventory.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def playbook(args, tmp_path):
    # -v (the default callback's full results): these tests read the modules' messages and results;
    # tests/integration/test_screen.py covers the operator's screen at default verbosity.
    env = dict(os.environ, ANSIBLE_VERBOSITY="1",
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_NOCOLOR="1", PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("DATABASE_URL", None)
    res = subprocess.run([str(PLAYBOOK), *args, "-e", f"report_dir={tmp_path / 'reports'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    return res.returncode, res.stdout + res.stderr


def stages_playbook(tmp_path):
    """The first two stages of playbooks/migrate.yml (precheck, then backup), as a standalone playbook."""
    path = tmp_path / "stages.yml"
    path.write_text(f"""---
- name: Start the run
  hosts: all
  gather_facts: false
  vars: &local
    ansible_connection: local
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
  pre_tasks:
    - name: Check the limit and name the run
      ansible.builtin.import_tasks: {ROOT}/playbooks/tasks/require_limit.yml

- name: Precheck and back up
  hosts: all
  gather_facts: false
  vars: *local
  roles:
    - role: arrakis.ledger.precheck
    - role: arrakis.ledger.backup
""")
    return path


def test_precheck_playbook_refuses_with_every_reason(empty_db, tmp_path):
    idle = psycopg2.connect(empty_db)
    with idle.cursor() as cur:
        cur.execute("SELECT 1")  # idle in transaction from now on
    pid = idle.get_backend_pid()
    time.sleep(1.2)
    try:
        inv = inventory(tmp_path, empty_db)
        rc, out = playbook(["-i", str(inv), "playbooks/precheck.yml", "-l", "mydb",
                            "-e", "precheck_long_tx_seconds=1", "-e", "ledger_environment=production"], tmp_path)
    finally:
        idle.close()
    assert rc == 2, out
    assert "precheck refused postgres@127.0.0.1" in out and "2 of" in out
    assert "- maintenance_window: production requires an acknowledged maintenance window" in out
    assert "- idle_in_transaction: 1 session(s) idle in transaction" in out and f"pid {pid}" in out
    assert ("`ansible-playbook playbooks/precheck.yml -i %s -l mydb -e precheck_long_tx_seconds=1"
            " -e ledger_environment=production -e report_dir=%s`" % (inv, tmp_path / "reports")) in " ".join(out.split())
    assert not schema_exists(empty_db)


def test_refused_run_changes_nothing_and_takes_no_backup(empty_db, tmp_path):
    backups = tmp_path / "backups"
    rc, out = playbook(["-i", str(inventory(tmp_path, empty_db, backup_dir=backups, ledger_environment="production")),
                        str(stages_playbook(tmp_path)), "-l", "mydb", "-e", f"migrations_dir={MIGRATIONS}"], tmp_path)
    assert rc == 2, out
    assert "maintenance_window" in out and "Dump, verify and record the backup" not in out
    assert "changed=0" in out
    assert not backups.exists()
    assert not schema_exists(empty_db) and not schema_exists(empty_db, "app")


def test_pending_migrations_are_backed_up_then_nothing_pending_skips_the_backup(empty_db, tmp_path):
    backups = tmp_path / "backups"
    inv = str(inventory(tmp_path, empty_db, backup_dir=backups))
    args = ["-i", inv, str(stages_playbook(tmp_path)), "-l", "mydb", "-e", f"migrations_dir={MIGRATIONS}"]

    rc, out = playbook(args + ["--check"], tmp_path)
    assert rc == 0, out
    assert not backups.exists() and not schema_exists(empty_db)

    rc, out = playbook(args, tmp_path)
    assert rc == 0, out
    assert len(list(backups.glob("*_base_*.dump"))) == 1 and len(list(backups.glob("*.dump.json"))) == 1
    assert [a for a, _o, _r in events(empty_db)] == ["rehearse", "precheck", "backup"]

    _record_applied(empty_db, ["0008", "0009", "0010", "0011"])
    rc, out = playbook(args, tmp_path)
    assert rc == 0, out
    assert "changed=0" in out and "Dump, verify and record the backup" not in out
    assert len(list(backups.glob("*.dump"))) == 1
