"""Staging before production: the promotion stamp (roles/promotion) on real PostgreSQL 15.

Each test runs the role through ansible-playbook as the pipeline does. The targets'
migrations.history is written by hand (the engine is tested elsewhere): what matters
here is which set a target holds, and whether production accepts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
import yaml

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import ensure_records, log_event
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = RUNBOOK_SET  # the runbook's 0008-0011, whatever else files/migrations holds
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


def up_files(migrations_dir: Path, up_to: str | None = None) -> list[Path]:
    files = [p for p in sorted(migrations_dir.glob("[0-9][0-9][0-9][0-9]_*.sql")) if not p.name.endswith(".down.sql")]
    return [p for p in files if up_to is None or p.name[:4] <= up_to]


def sha256sum_checksum(files: list[Path]) -> str:
    """The documented recipe: sha256sum FILES | LC_ALL=C sort -k2 | sha256sum, computed independently."""
    res = subprocess.run("sha256sum " + " ".join(p.name for p in files) + " | LC_ALL=C sort -k2 | sha256sum",
                         shell=True, cwd=files[0].parent, capture_output=True, text=True, check=True)
    return res.stdout.split()[0]


def set_history(url: str, migrations_dir: Path, up_to: str) -> None:
    """Record the target as holding the set up to a version (as the engine would)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            ensure_records(cur)
            cur.execute("DELETE FROM migrations.history")
            for path in up_files(migrations_dir, up_to):
                cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
                            " VALUES (%s, %s, %s, 'test', 1, 'test-run')",
                            (path.name[:4], path.stem[5:], hashlib.sha256(path.read_bytes()).hexdigest()))
    finally:
        conn.close()


def verify_event(url: str, run_id: str = "run-record", outcome: str = "passed") -> None:
    """The event ledger_verify appends after a verify of this run on this target."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            ensure_records(cur)
            log_event(cur, run_id, "verify", outcome, detail={"target": "test"})
    finally:
        conn.close()


def staged(url: str, up_to: str = "0011") -> None:
    """A staging target that holds the set up to a version and passed verify in run-record."""
    set_history(url, MIGRATIONS, up_to)
    verify_event(url)


def events(url: str, action: str) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id, outcome, version, detail FROM migrations.events WHERE action = %s ORDER BY id",
                        (action,))
            return cur.fetchall()
    finally:
        conn.close()


class Runner:
    """Runs roles/promotion (record or check) against one target, as the pipeline imports it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.stamps = tmp / "promotions"
        self.reports = tmp / "reports"

    def run(self, step: str, url: str, environment: str, *extra: str, check: bool = False,
            migrations_dir: Path = MIGRATIONS) -> subprocess.CompletedProcess:
        inventory = self.tmp / f"inv-{step}.yml"
        inventory.write_text(yaml.safe_dump({"all": {"hosts": {f"{environment}-db": {
            "database_url": url, "ledger_environment": environment, "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable}}}}))
        playbook = self.tmp / f"{step}.yml"
        playbook.write_text(yaml.safe_dump([{"name": step, "hosts": "all", "gather_facts": False, "tasks": [
            {"name": "Promotion " + step, "ansible.builtin.import_role": {"name": "arrakis.ledger.promotion", "tasks_from": step}}]}]))
        cmd = [ANSIBLE_PLAYBOOK, str(playbook), "-i", str(inventory), "-e", f"promotion_dir={self.stamps}",
               "-e", f"migrations_dir={migrations_dir}", "-e", f"report_dir={self.reports}",
               "-e", "ledger_run_id=run-" + step, "-v", *extra]
        if check:
            cmd.append("--check")
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_NOCOLOR="1")
        env.pop("LEDGER_STAGING_URL", None)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def runner(tmp_path):
    return Runner(tmp_path)


@pytest.fixture
def staging_url(pg_cluster):
    name = pg_cluster.create_db()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_db(name)


production_url = staging_url


def test_staging_records_the_stamp_of_the_set_it_verified(runner, staging_url):
    staged(staging_url)
    res = runner.run("record", staging_url, "staging")
    assert res.returncode == 0, res.stdout + res.stderr
    checksum = sha256sum_checksum(up_files(MIGRATIONS))
    stamp = json.loads((runner.stamps / f"{checksum}.json").read_text())
    assert stamp["set_checksum"] == checksum and stamp["version"] == "0011"
    assert [f["file"] for f in stamp["files"]] == [p.name for p in up_files(MIGRATIONS)]
    [entry] = stamp["stamps"]
    assert entry["environment"] == "staging" and entry["verify"] == "passed" and entry["run_id"] == "run-record"
    assert entry["recorded_at"] and "@" in entry["target"]
    assert entry["verify_event"]["action"] == "verify" and entry["verify_event"]["outcome"] == "passed"
    [event] = events(staging_url, "promotion_stamp")
    assert event[0] == "run-record" and event[1] == "recorded" and event[3]["set_checksum"] == checksum
    # A second verified run of the same set records nothing new.
    again = runner.run("record", staging_url, "staging")
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout
    assert len(events(staging_url, "promotion_stamp")) == 1


def test_record_refuses_a_set_that_differs_from_what_staging_applied(runner, staging_url, tmp_path):
    edited = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, edited)
    staged(staging_url)
    target = up_files(edited)[-1]
    target.write_text(target.read_text() + "\n-- edited after staging applied it\n")
    res = runner.run("record", staging_url, "staging", migrations_dir=edited)
    assert res.returncode != 0
    assert target.name[:4] in res.stdout and "differ" in res.stdout
    assert not runner.stamps.exists() or not list(runner.stamps.glob("*.json"))


def test_record_in_check_mode_writes_nothing(runner, staging_url):
    # In --check, verify records no event: record says what it would do, once verify passes.
    set_history(staging_url, MIGRATIONS, "0011")
    res = runner.run("record", staging_url, "staging", check=True)
    assert res.returncode == 0, res.stdout
    assert "once verify of the run has passed" in res.stdout
    assert not runner.stamps.exists() or not list(runner.stamps.glob("*.json"))
    assert events(staging_url, "promotion_stamp") == []


def test_record_refuses_without_a_verify_event_of_this_run(runner, staging_url):
    set_history(staging_url, MIGRATIONS, "0011")
    # Verify skipped (--skip-tags) or verify_record_event=false: no verify event at all.
    res = runner.run("record", staging_url, "staging")
    assert res.returncode != 0
    assert "no verify event of run run-record" in res.stdout and "is not stamped" in res.stdout
    assert "--skip-tags" in res.stdout and "playbooks/migrate.yml -l staging-db" in res.stdout
    assert not runner.stamps.exists() or not list(runner.stamps.glob("*.json"))
    # A passing verify of another run on this target does not vouch for this run.
    verify_event(staging_url, run_id="an-earlier-run")
    res = runner.run("record", staging_url, "staging")
    assert res.returncode != 0 and "no verify event of run run-record" in res.stdout
    assert events(staging_url, "promotion_stamp") == []


@pytest.mark.parametrize("outcome", ["failed", "error"])
def test_record_refuses_when_verify_of_this_run_did_not_pass(runner, staging_url, outcome):
    set_history(staging_url, MIGRATIONS, "0011")
    verify_event(staging_url, outcome="passed")
    verify_event(staging_url, outcome=outcome)  # the newest verify of the run counts
    res = runner.run("record", staging_url, "staging")
    assert res.returncode != 0
    assert "verify of run run-record" in res.stdout and "ended '%s'" % outcome in res.stdout
    assert not runner.stamps.exists() or not list(runner.stamps.glob("*.json"))
    assert events(staging_url, "promotion_stamp") == []


def test_the_bare_role_refuses_and_names_its_two_steps(runner, staging_url):
    staged(staging_url)
    playbook = runner.tmp / "bare.yml"
    playbook.write_text(yaml.safe_dump([{"name": "bare", "hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Promotion", "ansible.builtin.import_role": {"name": "arrakis.ledger.promotion"}}]}]))
    runner.run("record", staging_url, "staging", check=True)  # writes the inventory
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    res = subprocess.run([ANSIBLE_PLAYBOOK, str(playbook), "-i", str(runner.tmp / "inv-record.yml"),
                          "-e", f"promotion_dir={runner.stamps}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode != 0
    assert "tasks_from: check" in res.stdout and "tasks_from: record" in res.stdout
    assert not runner.stamps.exists() or not list(runner.stamps.glob("*.json"))


def test_urls_are_never_shown(runner, staging_url, production_url):
    secret_url = staging_url.replace("postgres@", "postgres:S3cretPw@")
    set_history(production_url, MIGRATIONS, "0009")
    extra = runner.tmp / "secret-vars.yml"  # not on the command line, which -vvv echoes
    extra.write_text(yaml.safe_dump({"promotion_staging_url": secret_url}))
    res = runner.run("check", production_url, "production", "-vvv", "-e", f"@{extra}")
    assert res.returncode != 0
    assert "has not passed verify on staging" in res.stdout
    assert "postgres@127.0.0.1" in res.stdout  # staging is named, without its password
    assert "S3cretPw" not in res.stdout + res.stderr


def test_production_refuses_a_set_without_a_staging_stamp(runner, production_url):
    set_history(production_url, MIGRATIONS, "0009")
    res = runner.run("check", production_url, "production")
    assert res.returncode != 0
    checksum = sha256sum_checksum(up_files(MIGRATIONS))
    assert "has not passed verify on staging" in res.stdout
    assert checksum in res.stdout and "promotion_override=true" in res.stdout
    assert "migrate.yml -l staging" in res.stdout


def test_production_accepts_the_set_staging_stamped(runner, staging_url, production_url):
    staged(staging_url)
    assert runner.run("record", staging_url, "staging").returncode == 0
    set_history(production_url, MIGRATIONS, "0009")
    res = runner.run("check", production_url, "production")
    assert res.returncode == 0, res.stdout
    assert "passed verify on staging" in res.stdout


def test_a_stamp_of_another_set_does_not_count(runner, staging_url, production_url, tmp_path):
    staged(staging_url)
    assert runner.run("record", staging_url, "staging").returncode == 0
    edited = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, edited)
    last = up_files(edited)[-1]
    last.write_text(last.read_text() + "\n-- not what staging verified\n")
    set_history(production_url, MIGRATIONS, "0009")
    res = runner.run("check", production_url, "production", migrations_dir=edited)
    assert res.returncode != 0
    assert sha256sum_checksum(up_files(edited)) in res.stdout
    # Nor does a prefix of the stamped set: staging verified 0011, not 0010.
    res = runner.run("check", production_url, "production", "-e", "migrate_target=0010")
    assert res.returncode != 0 and "migrate_target=0010" in res.stdout


def test_a_forged_stamp_file_does_not_count(runner, staging_url, production_url):
    staged(staging_url)
    assert runner.run("record", staging_url, "staging").returncode == 0
    [path] = runner.stamps.glob("*.json")
    stamp = json.loads(path.read_text())
    stamp["files"][0]["sha256"] = "0" * 64  # the file list no longer hashes to the name
    path.write_text(json.dumps(stamp))
    set_history(production_url, MIGRATIONS, "0009")
    assert runner.run("check", production_url, "production").returncode != 0
    stamp = json.loads(path.read_text())
    stamp["stamps"][0]["verify"] = "failed"
    path.write_text(json.dumps(stamp))
    assert runner.run("check", production_url, "production").returncode != 0


def test_production_accepts_a_stamp_found_in_stagings_events(runner, staging_url, production_url):
    staged(staging_url)
    assert runner.run("record", staging_url, "staging").returncode == 0
    shutil.rmtree(runner.stamps)  # as in AWX: the file was never committed
    set_history(production_url, MIGRATIONS, "0009")
    assert runner.run("check", production_url, "production").returncode != 0
    res = runner.run("check", production_url, "production", "-e", f"promotion_staging_url={staging_url}")
    assert res.returncode == 0, res.stdout
    assert "staging's migrations.events" in res.stdout


def test_the_override_is_explicit_and_logged(runner, production_url):
    set_history(production_url, MIGRATIONS, "0009")
    res = runner.run("check", production_url, "production", "-e", "promotion_override=true", check=True)
    assert res.returncode == 0, res.stdout
    assert events(production_url, "promotion_override") == []  # --check writes nothing
    res = runner.run("check", production_url, "production", "-e", "promotion_override=true")
    assert res.returncode == 0, res.stdout
    assert "promotion_override=true" in res.stdout + res.stderr  # the warning
    [event] = events(production_url, "promotion_override")
    assert event[0] == "run-check" and event[1] == "overridden" and len(event[3]["set_checksum"]) == 64


def test_nothing_pending_needs_no_stamp(runner, production_url):
    set_history(production_url, MIGRATIONS, "0011")
    res = runner.run("check", production_url, "production")
    assert res.returncode == 0, res.stdout
    assert "nothing to promote" in res.stdout


def test_other_environments_neither_record_nor_check(runner, staging_url):
    set_history(staging_url, MIGRATIONS, "0009")
    assert runner.run("check", staging_url, "local").returncode == 0
    assert runner.run("record", staging_url, "production").returncode == 0
    assert not runner.stamps.exists()


def test_migrate_yml_promotes_a_set_from_staging_to_production(tmp_path, pg_cluster):
    """The pipeline itself: production refuses, staging migrates and stamps, then production migrates."""
    names = {env: pg_cluster.create_db() for env in ("staging", "production")}
    urls = {env: pg_cluster.url(name) for env, name in names.items()}
    try:
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {"hosts": {
            f"{env}-db": {"database_url": url, "ledger_environment": env} for env, url in urls.items()}}}))

        def migrate(limit):
            cmd = [ANSIBLE_PLAYBOOK, "playbooks/migrate.yml", "-i", str(inventory), "-l", limit,
                   "-e", f"promotion_dir={tmp_path / 'promotions'}", "-e", f"backup_dir={tmp_path / 'backups'}",
                   "-e", f"report_dir={tmp_path / 'reports'}", "-e", "maintenance_window_ack=true",
                   "-e", f"migrations_dir={MIGRATIONS}"]
            env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
            for name in ("DATABASE_URL", "LEDGER_STAGING_URL"):
                env.pop(name, None)
            return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

        def applied(env):
            conn = psycopg2.connect(urls[env])
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT to_regclass('migrations.history') IS NOT NULL")
                    if not cur.fetchone()[0]:
                        return []
                    cur.execute("SELECT version FROM migrations.history ORDER BY version")
                    return [r[0] for r in cur.fetchall()]
            finally:
                conn.close()

        refused = migrate("production-db")
        assert refused.returncode != 0 and "has not passed verify on staging" in refused.stdout
        assert applied("production") == []  # refused before precheck, backup or any change
        assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").rglob("*.dump"))

        staged = migrate("staging-db")
        assert staged.returncode == 0, staged.stdout[-3000:]
        checksum = sha256sum_checksum(up_files(MIGRATIONS))
        assert (tmp_path / "promotions" / f"{checksum}.json").is_file()

        promoted = migrate("production-db")
        assert promoted.returncode == 0, promoted.stdout[-3000:]
        assert applied("production") == [p.name[:4] for p in up_files(MIGRATIONS)]
        assert "promotion" in json.loads(sorted((tmp_path / "reports").glob("*.json"),
                                                key=lambda p: p.stat().st_mtime)[-1].read_text()
                                         )["targets"]["production-db"]["stages"]
    finally:
        for name in names.values():
            pg_cluster.drop_db(name)
