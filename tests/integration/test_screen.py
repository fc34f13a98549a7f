"""What the operator sees (plugins/callback/ledger_screen.py) at default verbosity, through ansible-playbook.

A success is one line per stage and target, then the recap and the report's path; a failure is one
block, said once, whose next command carries the run's -i, -l and each -e, quoted for a shell; a
rehearsal says which statement it did not rehearse as written; -v brings the default output back.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


@pytest.fixture
def target(pg_cluster):
    name = pg_cluster.create_db()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_db(name)


def play(tmp: Path, url: str, *extra: str, playbook="migrate.yml"):
    inventory = tmp / "my inventory.yml"  # a space: the next command must quote it
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"db1": {"database_url": url}}}}))
    cmd = [ANSIBLE_PLAYBOOK, "playbooks/" + playbook, "-i", str(inventory), "-l", "db1",
           "-e", f"backup_dir={tmp / 'backups'}", "-e", f"report_dir={tmp / 'reports'}", *extra]
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env.pop("DATABASE_URL", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    return res.returncode, res.stdout + res.stderr, cmd


def lines(out):
    return [line for line in out.splitlines() if line.strip()]


def test_a_success_is_one_line_per_stage_then_the_report(tmp_path, target):
    rc, out, _cmd = play(tmp_path, target, "-e", f"migrations_dir={RUNBOOK_SET}")
    assert rc == 0, out
    got = lines(out)
    assert len(got) == 7, out  # 4 stages, PLAY RECAP, its host line, the report
    assert re.fullmatch(r"db1: precheck: (\d+)/\1 checks passed", got[0]), got[0]
    assert got[1].startswith("db1: backup: %s/" % (tmp_path / "backups")) and "sha256 " in got[1] \
        and "verified: pg_dump exit status + sha256 + full read" in got[1]
    assert got[2].startswith("db1: migrate: applied 0008-0011 to ") and got[2].endswith("(now at 0011)")
    assert re.fullmatch(r"db1: verify: (\d+)/\1 checks passed on \S+ \(versions 0008-0011\)", got[3]), got[3]
    assert got[6].startswith("Run report: %s/" % (tmp_path / "reports"))
    assert "TASK [" not in out and "Validating arguments" not in out and "ok: [" not in out
    # Nothing pending: the backup says so, the migrate stage too.
    rc, out, _cmd = play(tmp_path, target, "-e", f"migrations_dir={RUNBOOK_SET}")
    assert rc == 0 and "db1: backup: not needed (nothing pending)" in out and "migrate: nothing pending" in out
    # -v: the default callback's output is back.
    rc, out, _cmd = play(tmp_path, target, "-e", f"migrations_dir={RUNBOOK_SET}", "-v")
    assert rc == 0 and "TASK [" in out and len(lines(out)) > 50


def test_a_failure_is_one_block_said_once_with_a_next_command_that_pastes(tmp_path, target):
    migrations = tmp_path / "set"
    migrations.mkdir()
    (migrations / "0001_ok.sql").write_text("CREATE TABLE public.screen_ok (id int);\n")
    (migrations / "0002_broken.sql").write_text("-- fails on purpose\nCREATE TABLE public.b (id int);\nSELECT 1 / 0;\n")
    rc, out, cmd = play(tmp_path, target, "-e", f"migrations_dir={migrations}", "-e", "precheck_rehearse=false",
                        "-e", 'note="two words"')
    assert rc == 2, out
    assert out.count("SQLSTATE 22012") == 1 and out.count("division by zero") == 1, out
    block = [line for line in out.splitlines() if line.startswith("FAILED") or line.startswith("  ")]
    assert block[0].startswith("FAILED db1: migration of 0002 failed on ") and "0002_broken.sql line 3" in block[0]
    assert len(block) == 4, out  # the failure, the statement, the state left, the next command
    assert "statement (line 3): SELECT 1 / 0" in block[1]
    assert "nothing of 0002_broken.sql is applied" in block[2]
    nxt = block[3].strip()
    assert nxt.startswith("next: ") and "''" not in nxt.replace("'\"'\"'", "")
    # The command between the first pair of backticks pastes back to exactly this run's options.
    argv = shlex.split(nxt.split("`")[1])
    assert argv == ["ansible-playbook", "playbooks/migrate.yml"] + cmd[2:]
    assert "Validating arguments" not in out and "TASK [" not in out and "fatal: [" not in out


def test_a_rehearsal_says_what_it_did_not_rehearse(tmp_path, target):
    migrations = tmp_path / "set"
    shutil.copytree(RUNBOOK_SET, migrations)
    (migrations / "0012_lot_entries_idx.sql").write_text(
        "-- ledger:no-transaction\nCREATE INDEX CONCURRENTLY lot_entries_screen_idx ON public.lot_entries (lot_id);\n")
    rc, out, _cmd = play(tmp_path, target, "-e", f"migrations_dir={migrations}", "--check")
    assert rc == 0, out
    got = lines(out)
    assert len(got) == 7, out
    assert got[1].startswith("db1: backup: not taken under --check")
    assert got[2].startswith("db1: migrate (rehearsal, rolled back): 0008-0012 would apply on ")
    assert got[2].endswith("not rehearsed: 0012_lot_entries_idx.sql line 2: rehearsed without CONCURRENTLY")
