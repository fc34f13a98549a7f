"""After converge: the canary's failure stopped the first rollout; the second migrated all four.

testinfra runs on the control node (local://), where the four clusters listen and
where the run reports were written.
"""

import json
import os
import stat
from pathlib import Path

import pytest
from ledgertest import shipped_versions

PORT_BASE = int(os.environ.get("LEDGER_MOLECULE_PORT_BASE", "55600"))
PORTS = {"fleet-1": PORT_BASE + 41, "fleet-2": PORT_BASE + 42, "fleet-3": PORT_BASE + 43, "fleet-4": PORT_BASE + 44}
REPORTS = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "reports"


def sql(host, target, query):
    url = f"postgresql://postgres@127.0.0.1:{PORTS[target]}/ledger"
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", url, query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


@pytest.fixture(scope="module")
def reports():
    """The two runs' reports, oldest first."""
    found = sorted((json.loads(p.read_text()) for p in REPORTS.glob("*.json")), key=lambda r: r["started_at"])
    assert len(found) == 2, f"expected the reports of two runs in {REPORTS}"
    return found


@pytest.mark.parametrize("target", sorted(PORTS))
def test_every_target_ends_at_the_newest_version_of_the_set(host, target):
    assert sql(host, target, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history") == \
        ",".join(shipped_versions())


def test_the_canary_failed_with_42p07_on_0010_in_the_first_run(host, reports):
    first = reports[0]["run_id"]
    row = sql(host, "fleet-1", "SELECT outcome || ' ' || coalesce(detail->>'sqlstate', '') FROM migrations.events"
                               f" WHERE run_id = '{first}' AND version = '0010' AND action = 'apply'"
                               " ORDER BY id DESC LIMIT 1")
    assert row.startswith("failed") and "42P07" in row


@pytest.mark.parametrize("target", ["fleet-2", "fleet-3", "fleet-4"])
def test_the_first_run_never_reached_the_other_targets(host, reports, target):
    first, second = reports[0]["run_id"], reports[1]["run_id"]
    assert sql(host, target, f"SELECT count(*) FROM migrations.events WHERE run_id = '{first}'") == "0"
    assert int(sql(host, target, f"SELECT count(*) FROM migrations.events WHERE run_id = '{second}'")) > 0


# The line of 0010 that the pre-created webhook_events makes fail (42P07).
WEBHOOK_LINE = next(n for n, line in enumerate(
    (Path(__file__).resolve().parents[3] / "files" / "migrations" / "0010_webhook_events_crypto_payments.sql")
    .read_text().splitlines(), 1) if line.startswith("CREATE TABLE public.webhook_events"))


def test_the_first_report_says_failed_and_untouched(reports):
    report = reports[0]
    assert report["status"] == "failed"
    assert report["summary"] == {"done": [], "failed": ["fleet-1"], "interrupted": [],
                                 "untouched": ["fleet-2", "fleet-3", "fleet-4"]}
    failure = report["targets"]["fleet-1"]["failure"]
    assert failure["stage"] == "migrate" and failure["sqlstate"] == "42P07"
    assert failure["file"].endswith("0010_webhook_events_crypto_payments.sql") and failure["line"] == WEBHOOK_LINE
    assert report["targets"]["fleet-1"]["migrations_applied"] == ["0008", "0009"]


def test_the_second_report_shows_the_batches_and_every_stage(reports):
    report = reports[1]
    assert report["batches"] == [["fleet-1"], ["fleet-2", "fleet-3"], ["fleet-4"]]
    assert report["summary"]["done"] == sorted(PORTS)
    for name in ("fleet-2", "fleet-3", "fleet-4"):
        target = report["targets"][name]
        assert [s for s in target["stages"] if s != "promotion"][:4] == ["precheck", "backup", "migrate", "verify"]
        assert target["migrations_applied"] == shipped_versions()
        assert len(target["backup"]["sha256"]) == 64 and Path(target["backup"]["file"]).is_file()
        assert target["verify"]["outcome"] in ("ok", "changed")
    assert report["targets"]["fleet-1"]["migrations_applied"] == [v for v in shipped_versions() if v >= "0010"]


def test_reports_are_private():
    assert stat.S_IMODE(REPORTS.stat().st_mode) == 0o700
    for path in REPORTS.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert {p.suffix for p in REPORTS.iterdir()} == {".json", ".md"}
