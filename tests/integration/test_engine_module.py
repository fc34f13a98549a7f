"""The ledger_migrate module and the migrate role: through the module's Python functions
and through real ansible-playbook runs (the role, playbooks/status.yml) against PostgreSQL 15."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError

from ledgertest import BASIC, write_set
from test_engine import events, history, one




ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"


ledger_migrate = importlib.import_module("ansible_collections.arrakis.ledger.plugins.modules.ledger_migrate")


class FakeModule:
    """What run() reads from AnsibleModule: params (with the argument_spec's defaults) and check_mode."""

    def __init__(self, check_mode=False, **params):
        defaults = dict(action="apply", target=None, run_id=None, lock_timeout="2s", statement_timeout="0",
                        lock_retries=3, lock_retry_backoff=0.5, lock_wait=None, lock_ttl=60.0,
                        direct_url=None, allow_out_of_order=False, baseline_version=None, accept_version=None,
                        revert_to=None, limit="testenv", fail_on_drift=False, record_rehearsal=False)
        defaults.update(params)
        self.params = defaults
        self.check_mode = check_mode


def _run(fake):
    """The module's run() with what AnsibleModule would have validated."""
    return ledger_migrate.run(fake.params, fake.check_mode)


BROKEN = {
    "0004_broken.sql": """
        -- fails at line 4, after a statement that succeeded
        CREATE TABLE probe (i int);
        SELECT 1 /
               0;
    """,
}


def test_module_check_mode_is_a_rehearsal_that_writes_nothing(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    res = _run(FakeModule(check_mode=True, database_url=empty_db, migrations_dir=str(d)))
    assert res["changed"] is True and res["pending"] == ["0001", "0002", "0003"]
    assert [r["status"] for r in res["rehearsal"]] == ["would_apply"] * 3
    assert "rolled back, nothing written" in res["msg"]
    assert one(empty_db, "SELECT to_regclass('migrations.history') IS NULL")

    write_set(d, BROKEN)
    _run(FakeModule(database_url=empty_db, migrations_dir=str(d), target="0002"))
    # 0003 would apply, 0004 would fail: the rehearsal reports both, in order, and changes nothing.
    n = one(empty_db, "SELECT count(*) FROM migrations.events")
    with pytest.raises(LedgerError) as exc:
        _run(FakeModule(check_mode=True, database_url=empty_db, migrations_dir=str(d)))
    f = exc.value.fields
    assert (f["file"], f["line"], f["sqlstate"]) == ("0004_broken.sql", 3, "22012")
    assert [r["status"] for r in f["rehearsal"]] == ["would_apply", "would_fail"]
    assert "would fail at line 3" in exc.value.msg and "--check" in f["next_command"]
    assert one(empty_db, "SELECT count(*) FROM migrations.events") == n
    assert one(empty_db, "SELECT to_regclass('public.probe') IS NULL")


def test_module_apply_status_and_record_rehearsal(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    res = _run(FakeModule(database_url=empty_db, migrations_dir=str(d), record_rehearsal=True,
                          run_id="mod-run"))
    assert res["applied_versions"] == ["0001", "0002", "0003"] and len(res["rehearsal"]) == 3
    assert [e[2] for e in events(empty_db, "rehearse")] == ["ok"]
    again = _run(FakeModule(database_url=empty_db, migrations_dir=str(d)))
    assert again["changed"] is False
    st = _run(FakeModule(database_url=empty_db, migrations_dir=str(d), action="status"))
    assert [a["version"] for a in st["applied"]] == ["0001", "0002", "0003"] and st["pending"] == []
    (d / "0002_entries.sql").write_text("-- edited\n" + (d / "0002_entries.sql").read_text())
    with pytest.raises(LedgerError, match="drift on"):
        _run(FakeModule(database_url=empty_db, migrations_dir=str(d), action="status",
                        fail_on_drift=True))
    rev = _run(FakeModule(database_url=empty_db, migrations_dir=str(d), action="revert",
                          revert_to="0002"))
    assert [r["version"] for r in rev["reverted"]] == ["0003"] and history(empty_db) == ["0001", "0002"]


# --------------------------------------------------------------------------- ansible-playbook

def playbook(tmp_path, *args, env=None):
    cmd = [str(BIN / "ansible-playbook"), *args, "-e", "report_dir=%s" % (tmp_path / "reports")]
    # -v (the default callback's full results): these tests read the modules' messages and results;
    # tests/integration/test_screen.py covers the operator's screen at default verbosity.
    full_env = dict(os.environ, ANSIBLE_VERBOSITY="1",
                    ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                    ANSIBLE_HOME=str(ROOT / ".ansible"), PATH="%s:%s" % (BIN, os.environ.get("PATH", "")))
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def inventory(tmp_path, empty_db):
    d = write_set(tmp_path / "m", BASIC)
    inv = tmp_path / "hosts.yml"
    inv.write_text(json.dumps({"all": {"hosts": {"t1": {
        "database_url": empty_db, "migrations_dir": str(d)}}}}))
    play = tmp_path / "migrate_only.yml"
    play.write_text(textwrap.dedent("""\
        - name: Apply the migrations with the migrate role only
          hosts: all
          gather_facts: false
          vars:
            ansible_connection: local
            ansible_python_interpreter: "{{ ansible_playbook_python }}"
          roles:
            - role: arrakis.ledger.migrate
        """))
    return inv, play, d


def test_the_role_applies_rehearses_and_is_idempotent(tmp_path, empty_db, inventory):
    inv, play, d = inventory
    ok = playbook(tmp_path, "-i", str(inv), "-l", "t1", str(play), "-e", "migrate_target=0002")
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "applied 0001_accounts.sql, 0002_entries.sql" in ok.stdout and "changed=1" in ok.stdout, ok.stdout
    assert history(empty_db) == ["0001", "0002"]

    n = one(empty_db, "SELECT count(*) FROM migrations.events")
    check = playbook(tmp_path, "-i", str(inv), "-l", "t1", str(play), "--check")
    assert check.returncode == 0, check.stdout[-3000:]
    assert "0003_entries_amount.sql: would apply" in check.stdout and "changed=1" in check.stdout
    assert one(empty_db, "SELECT count(*) FROM migrations.events") == n and history(empty_db) == ["0001", "0002"]

    again = playbook(tmp_path, "-i", str(inv), "-l", "t1", str(play), "-e", "migrate_target=0002")
    assert again.returncode == 0 and "changed=0" in again.stdout and "nothing to apply" in again.stdout
    assert one(empty_db, "SELECT count(*) FROM migrations.events") == n


def test_the_role_reports_a_failed_migration_and_status_exits_non_zero_on_drift(tmp_path, empty_db, inventory):
    inv, play, d = inventory
    write_set(d, BROKEN)

    check = playbook(tmp_path, "-i", str(inv), "-l", "t1", str(play), "--check")
    assert check.returncode == 2
    assert "0004_broken.sql: would fail at line 3: SQLSTATE 22012" in check.stdout
    assert one(empty_db, "SELECT to_regclass('migrations.history') IS NULL")  # --check wrote nothing

    res = playbook(tmp_path, "-i", str(inv), "-l", "t1", str(play))
    out = res.stdout
    assert res.returncode == 2, out[-3000:]
    target = "postgres@127.0.0.1:%s" % empty_db.split(":")[2].split("/")[0]
    for needle in ("migration of 0004 failed on %s" % target, "0004_broken.sql line 3", "SQLSTATE 22012",
                   "division by zero", "ansible-playbook playbooks/rollback.yml -i %s -l t1 -e report_dir=%s -e rollback_to=base"
                   % (inv, tmp_path / "reports"),
                   "sqlstate: '22012'"):
        assert needle in " ".join(out.split()), needle  # the YAML callback wraps long lines
    # It applied 0003 before 0004 failed: the failed task says the target changed.
    fatal = out[out.index("fatal: [t1]"):]
    assert "\n    changed: true\n" in fatal and "\n    changed: false\n" not in fatal, fatal[:600]
    assert "Traceback" not in out + res.stderr
    assert history(empty_db) == ["0001", "0002", "0003"]  # this run applied 0003, then 0004 failed

    clean = playbook(tmp_path, "-i", str(inv), "-l", "t1", "playbooks/status.yml")
    assert clean.returncode == 0, clean.stdout[-3000:]
    assert "applied  0001 accounts" in clean.stdout and "pending  0004_broken.sql" in clean.stdout
    (d / "0001_accounts.sql").write_text("-- edited\n" + (d / "0001_accounts.sql").read_text())
    drift = playbook(tmp_path, "-i", str(inv), "-l", "t1", "playbooks/status.yml")
    assert drift.returncode == 2, drift.stdout[-3000:]
    assert "DRIFT    0001 edited" in drift.stdout and "Drift on postgres@" in drift.stdout
    nolimit = playbook(tmp_path, "-i", str(inv), "playbooks/status.yml")
    assert nolimit.returncode != 0 and "Refusing to run on every inventory host" in nolimit.stdout


def test_ansible_doc_renders_the_module_documentation():
    res = subprocess.run([str(BIN / "ansible-doc"), "arrakis.ledger.ledger_migrate"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                         env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1"))
    assert res.returncode == 0, res.stderr
    for needle in ("ledger_migrate", "database_url", "lock_timeout", "EXAMPLES", "RETURN VALUES", "next_command"):
        assert needle in res.stdout, needle
