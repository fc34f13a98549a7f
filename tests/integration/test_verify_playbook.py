"""playbooks/verify.yml and the verify role, end to end with ansible-playbook on a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg2
from pghelpers import events

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "verify.yml"


def play(tmp_path: Path, url: str, *extra: str, limit: str | None = "t1", verbose=True) -> subprocess.CompletedProcess:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    t1:\n      database_url: %s\n" % url)
    # -v (the default callback's full results): these tests read the modules' messages and results;
    # tests/integration/test_screen.py covers the operator's screen at default verbosity.
    env = dict(os.environ, ANSIBLE_VERBOSITY="1" if verbose else "0",
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_NOCOLOR="1", PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOK),
           "-e", "report_dir=%s" % (tmp_path / "reports"), *extra]
    if limit:
        cmd += ["-l", limit]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)



def verify_events(url: str) -> list[tuple]:
    return events(url, "outcome, run_id", action="verify")


def test_playbook_passes_and_records_the_run(tmp_path, ledger_db):
    res = play(tmp_path, ledger_db)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "verify passed on postgres@127.0.0.1:" in res.stdout
    assert "changed=0" in res.stdout
    events = verify_events(ledger_db)
    assert len(events) == 1 and events[0][0] == "passed"


def test_playbook_in_check_mode_writes_nothing(tmp_path, ledger_db):
    res = play(tmp_path, ledger_db, "--check")
    assert res.returncode == 0, res.stdout[-3000:]
    assert verify_events(ledger_db) == []


def test_playbook_failure_names_check_relation_observed_and_next_command(tmp_path, ledger_db):
    conn = psycopg2.connect(ledger_db)
    with conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE public.lot_entries DISABLE TRIGGER lot_entries_no_delete")
    conn.close()
    res = play(tmp_path, ledger_db, verbose=False)  # what the operator sees
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert out.count("FAILED t1: verify failed") == 1, out
    assert "- structure.append_only_triggers on public.lot_entries: DELETE not guarded (trigger" \
           " lot_entries_no_delete is disabled)" in out
    # The run's own options (-i, -l, each -e), quoted for a shell.
    assert ("`ansible-playbook playbooks/verify.yml -i %s -l t1 -e report_dir=%s`"
            % (tmp_path / "hosts.yml", tmp_path / "reports")) in " ".join(out.split())
    # The whole list of checks is not dumped on the operator: only the message.
    assert "structure.columns:public.credit_lots" not in out
    assert [e[0] for e in verify_events(ledger_db)] == ["failed"]


def test_playbook_refuses_to_run_without_a_limit(tmp_path, ledger_db):
    res = play(tmp_path, ledger_db, limit=None)
    assert res.returncode != 0
    assert "Refusing to run on every inventory host at once" in res.stdout + res.stderr
    assert verify_events(ledger_db) == []


def test_argument_specs_refuse_a_wrong_type(tmp_path, ledger_db):
    res = play(tmp_path, ledger_db, "-e", "verify_http_timeout=soon")
    assert res.returncode != 0
    assert "Validating arguments against arg spec" in res.stdout
    assert verify_events(ledger_db) == []
