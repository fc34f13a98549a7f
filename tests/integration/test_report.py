"""The run reports (plugins/callback/ledger_report.py) of real pipeline runs.

Every run of a pipeline playbook writes <report_dir>/<run_id>.json and .md: per target
each stage with its duration and outcome, the migrations applied, the backup file and
its sha256, the verify checks, and the failure with its SQLSTATE, file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ledgertest import RUNBOOK_SET
from pghelpers import q as query

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
ALL_VERSIONS = ["0008", "0009", "0010", "0011"]



@pytest.fixture
def target(pg_cluster):
    name = pg_cluster.create_db()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_db(name)


def run(tmp: Path, url: str, *extra: str, limit: str | None = "all", host_vars: dict | None = None,
        report_env: str | None = None):
    inventory = tmp / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {"ledger-1": {"database_url": url, **(host_vars or {})}}}}))
    cmd = [ANSIBLE_PLAYBOOK, "playbooks/migrate.yml", "-i", str(inventory), "-e", f"backup_dir={tmp / 'backups'}",
           "-e", f"migrations_dir={RUNBOOK_SET}",
           *extra]
    if limit:
        cmd += ["-l", limit]
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env.pop("DATABASE_URL", None)
    env.pop("LEDGER_REPORT_DIR", None)
    if report_env:
        env["LEDGER_REPORT_DIR"] = report_env
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def only_report(directory: Path) -> tuple[dict, str]:
    reports = sorted(directory.glob("*.json"))
    assert len(reports) == 1, reports
    return json.loads(reports[0].read_text()), reports[0].with_suffix(".md").read_text()


def test_a_run_reports_every_stage_of_every_target(tmp_path, target):
    reports = tmp_path / "chosen"
    # -e report_dir wins over the inventory's report_dir.
    res = run(tmp_path, target, "-e", f"report_dir={reports}", host_vars={"report_dir": str(tmp_path / "inventory")})
    assert res.returncode == 0, res.stdout[-3000:]
    assert not (tmp_path / "inventory").exists()
    report, markdown = only_report(reports)
    assert stat.S_IMODE(reports.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in reports.iterdir()} == {0o600}
    assert f"Run report: {reports / report['run_id']}.md" in res.stdout

    assert report["check_mode"] is False and report["status"] == "succeeded"
    assert report["summary"]["done"] == ["ledger-1"]
    tgt = report["targets"]["ledger-1"]
    assert tgt["target"] == target.split("://", 1)[1]  # user@host:port/db (this URL has no password)
    for name in ("precheck", "backup", "migrate", "verify"):
        stage = tgt["stages"][name]
        assert stage["outcome"] in ("ok", "changed"), (name, stage)
        assert stage["duration_s"] > 0 and stage["started_at"] <= stage["ended_at"]
    assert tgt["migrations_applied"] == ALL_VERSIONS

    backup = Path(tgt["backup"]["file"])
    assert backup.is_file() and tmp_path / "backups" in backup.parents
    assert tgt["backup"]["sha256"] == hashlib.sha256(backup.read_bytes()).hexdigest()

    checks = tgt["verify"]["checks"]
    assert len(checks) >= 5 and all(c.get("passed") is True for c in checks), checks

    # The run id of the report is the run id of every event this run wrote.
    actions = {r[0] for r in query(target, "SELECT action FROM migrations.events WHERE run_id = %s",
                                   (report["run_id"],))}
    assert {"backup", "apply"} <= actions, actions

    assert f"# Migration run {report['run_id']}" in markdown
    assert "| done (1) | ledger-1 |" in markdown
    assert "| migrate | changed |" in markdown
    assert tgt["backup"]["sha256"] in markdown


def test_a_check_run_is_reported_and_changes_nothing(tmp_path, target):
    res = run(tmp_path, target, "--check", report_env=str(tmp_path / "r"))  # as a test suite sets it
    assert res.returncode == 0, res.stdout[-3000:]
    report, markdown = only_report(tmp_path / "r")
    assert report["check_mode"] is True
    assert "--check rehearsal" in markdown
    assert report["targets"]["ledger-1"]["migrations_applied"] == []
    assert report["targets"]["ledger-1"]["migrations_pending"] == ALL_VERSIONS
    assert "Would apply: 0008, 0009, 0010, 0011" in markdown
    assert query(target, "SELECT to_regclass('migrations.history')")[0][0] is None


def test_a_failure_is_reported_with_sqlstate_file_and_line(tmp_path, target):
    query(target, "CREATE TABLE public.webhook_events (id integer)")  # 0010 creates it: 42P07, line 47
    res = run(tmp_path, target, "-e", "precheck_rehearse=false", "-e", f"report_dir={tmp_path / 'r'}")
    assert res.returncode != 0
    report, markdown = only_report(tmp_path / "r")
    assert report["status"] == "failed" and report["summary"]["failed"] == ["ledger-1"]
    tgt = report["targets"]["ledger-1"]
    assert tgt["stages"]["migrate"]["outcome"] == "failed"
    assert "verify" not in tgt["stages"]
    failure = tgt["failure"]
    assert failure["stage"] == "migrate" and failure["sqlstate"] == "42P07"
    assert Path(failure["file"]).name == "0010_webhook_events_crypto_payments.sql" and failure["line"] == 47
    assert "SQLSTATE 42P07" in markdown and "0010_webhook_events_crypto_payments.sql" in markdown


def test_the_default_report_dir_is_reports_beside_ansible_cfg(tmp_path, target):
    res = run(tmp_path, target)
    assert res.returncode == 0, res.stdout[-3000:]
    match = re.search(r"Run report: (\S+)\.md", res.stdout)
    assert match, res.stdout[-2000:]
    base = Path(match.group(1))
    try:
        assert base.parent == ROOT / "reports"
        assert stat.S_IMODE(base.parent.stat().st_mode) == 0o700
        assert json.loads(base.with_suffix(".json").read_text())["summary"]["done"] == ["ledger-1"]
    finally:
        for suffix in (".json", ".md"):
            base.with_suffix(suffix).unlink(missing_ok=True)


def test_a_run_refused_before_it_started_writes_no_report(tmp_path, target):
    res = run(tmp_path, target, "-e", f"report_dir={tmp_path / 'r'}", limit=None)
    assert res.returncode != 0 and "-l" in res.stdout
    assert not (tmp_path / "r").exists()
