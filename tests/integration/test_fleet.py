"""A user's own inventory of N databases: canary first, then batches; a failure stops the rollout.

Each host of the inventory sets only `database_url` (N databases in the session
cluster); the run is the real `playbooks/migrate.yml`. The report written by the
ledger_report callback says which targets are done, failed, interrupted and untouched,
and each database shows what really happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
import yaml
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
N = 5
ALL_VERSIONS = ["0008", "0009", "0010", "0011"]


def query(url: str, sql: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def history(url: str) -> list[str] | None:
    """Applied versions, or None when the run never created the records (never touched it)."""
    if query(url, "SELECT to_regclass('migrations.history')")[0][0] is None:
        return None
    return [r[0] for r in query(url, "SELECT version FROM migrations.history ORDER BY version")]


class Fleet:
    def __init__(self, tmp: Path, urls: dict[str, str]):
        self.tmp = tmp
        self.urls = urls
        self.hosts = list(urls)
        self.inventory = tmp / "inventory.yml"
        # The user's own inventory: every host sets only database_url.
        self.inventory.write_text(yaml.safe_dump({"all": {"hosts": {h: {"database_url": u} for h, u in urls.items()}}},
                                                 sort_keys=False))
        self.reports = tmp / "reports"

    def run(self, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
        before = set(self.reports.glob("*.json")) if self.reports.exists() else set()
        cmd = [ANSIBLE_PLAYBOOK, "playbooks/migrate.yml", "-i", str(self.inventory), "-l", "all",
               "-e", f"backup_dir={self.tmp / 'backups'}", "-e", f"report_dir={self.reports}",
               "-e", "migrate_batch_size=2", "-e", f"migrations_dir={RUNBOOK_SET}", *extra]
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        env.pop("DATABASE_URL", None)
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        new = sorted(set(self.reports.glob("*.json")) - before)
        assert len(new) == 1, f"expected one new report, found {new}\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
        return res, json.loads(new[0].read_text())

    def poison(self, host: str) -> None:
        """A table that 0010 creates: 0010 fails with 42P07 at apply time."""
        query(self.urls[host], "CREATE TABLE public.webhook_events (id integer)")


@pytest.fixture
def fleet(pg_cluster, tmp_path):
    names = [pg_cluster.create_db() for _ in range(N)]
    try:
        yield Fleet(tmp_path, {f"shard-{i + 1}": pg_cluster.url(name) for i, name in enumerate(names)})
    finally:
        for name in names:
            pg_cluster.drop_db(name)


def test_a_clean_rollout_goes_canary_first_then_batches_in_parallel(fleet):
    res, report = fleet.run()
    assert res.returncode == 0, res.stdout[-3000:]
    assert report["batches"] == [["shard-1"], ["shard-2", "shard-3"], ["shard-4", "shard-5"]]
    assert report["summary"] == {"done": fleet.hosts, "failed": [], "interrupted": [], "untouched": []}
    assert report["status"] == "succeeded"
    for host, url in fleet.urls.items():
        target = report["targets"][host]
        assert target["batch"] == (1 if host == "shard-1" else 2 if host in ("shard-2", "shard-3") else 3)
        # promotion (check before, record after) skips itself outside production and staging.
        assert [s for s in target["stages"] if s != "promotion"][:4] == ["precheck", "backup", "migrate", "verify"]
        assert target["migrations_applied"] == ALL_VERSIONS
        assert history(url) == ALL_VERSIONS
        # The report's run id is the run id of the events the run wrote on every target.
        assert query(url, f"SELECT count(*) FROM migrations.events WHERE run_id = '{report['run_id']}'")[0][0] > 0
    # Within a batch the targets migrate at the same time (forks), not one after the other.
    a, b = (report["targets"][h]["stages"]["migrate"] for h in ("shard-2", "shard-3"))
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
    # Batches follow each other: no target of batch 2 starts before the canary has verified.
    assert report["targets"]["shard-1"]["stages"]["verify"]["ended_at"] <= \
        report["targets"]["shard-2"]["stages"]["precheck"]["started_at"]


def test_the_canary_failing_stops_the_rollout(fleet):
    fleet.poison("shard-1")
    res, report = fleet.run("-e", "precheck_rehearse=false")
    assert res.returncode != 0
    assert "42P07" in res.stdout
    assert report["summary"] == {"done": [], "failed": ["shard-1"], "interrupted": [],
                                 "untouched": ["shard-2", "shard-3", "shard-4", "shard-5"]}
    assert report["batches"] == [["shard-1"]]
    assert report["targets"]["shard-1"]["failure"]["sqlstate"] == "42P07"
    assert history(fleet.urls["shard-1"]) == ["0008", "0009"]  # its last good version
    for host in fleet.hosts[1:]:
        assert history(fleet.urls[host]) is None, f"{host} was touched"
        assert report["targets"][host] == {"host": host, "outcome": "untouched", "stages": {}}


def test_a_failure_in_a_later_batch_stops_the_batches_after_it(fleet):
    fleet.poison("shard-3")
    res, report = fleet.run("-e", "precheck_rehearse=false")
    assert res.returncode != 0
    summary = report["summary"]
    assert summary["done"] == ["shard-1"] and summary["failed"] == ["shard-3"]
    assert summary["untouched"] == ["shard-4", "shard-5"]
    # shard-2 migrated beside shard-3, then the batch stopped before its verify: not "done".
    assert summary["interrupted"] == ["shard-2"]
    assert "verify" not in report["targets"]["shard-2"]["stages"]
    assert history(fleet.urls["shard-2"]) == ALL_VERSIONS
    assert history(fleet.urls["shard-3"]) == ["0008", "0009"]
    for host in ("shard-4", "shard-5"):
        assert history(fleet.urls[host]) is None
    markdown = (fleet.reports / (report["run_id"] + ".md")).read_text()
    assert "| untouched (2) | shard-4, shard-5 |" in markdown
    assert "| failed (1) | shard-3 |" in markdown
