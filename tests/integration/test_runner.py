"""The pipeline under ansible-runner, the job engine of AWX and Automation Platform.

A private data dir as AWX lays it out (project, inventory, env, artifacts); the collection
installed from its built artifact; a scram password in database_url. The job must exit 0,
and no job event and no line of the job's output may contain the password (the runner's own
record of the environment it was given is AWX's business, not the job's output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import yaml

from ledgertest import ROOT, RUNBOOK_SET, VERSIONS
from test_secrets import PASSWORD, USER, db, scram  # noqa: F401 - fixtures: a scram cluster and a database

RUNNER = str(Path(sys.executable).parent / "ansible-runner")


def test_migrate_under_ansible_runner_exits_0_and_no_event_holds_the_password(tmp_path, scram, db,  # noqa: F811
                                                                              installed_collection):
    pdd = tmp_path / "job"
    (pdd / "inventory").mkdir(parents=True)
    (pdd / "env").mkdir()
    (pdd / "project").symlink_to(ROOT)  # AWX checks the project out; this checkout stands for it
    (pdd / "inventory" / "hosts.yml").write_text(yaml.safe_dump(
        {"local": {"hosts": {"awx-ledger": {"database_url": scram.url(db), "ledger_environment": "local"}}}}))
    bundled = Path(sys.executable).parents[1] / "lib" / ("python%d.%d" % sys.version_info[:2]) / "site-packages"
    (pdd / "env" / "envvars").write_text(yaml.safe_dump({
        "ANSIBLE_COLLECTIONS_PATH": "%s:%s" % (installed_collection, bundled),
        "ANSIBLE_HOME": str(tmp_path / ".ansible"),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }))
    (pdd / "env" / "extravars").write_text(yaml.safe_dump(
        {"backup_dir": str(tmp_path / "backups"), "report_dir": str(tmp_path / "reports"),
         "migrations_dir": str(RUNBOOK_SET)}))
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.pop("ANSIBLE_CONFIG", None)
    res = subprocess.run([RUNNER, "run", str(pdd), "-p", "playbooks/migrate.yml", "--limit", "local",
                          "--ident", "job1", "--cmdline=-vvv"], env=env, capture_output=True, text=True, timeout=600, check=False)
    artifacts = pdd / "artifacts" / "job1"
    stdout = (artifacts / "stdout").read_text() if (artifacts / "stdout").exists() else ""
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert (artifacts / "rc").read_text().strip() == "0"
    # The roles and modules came from the installed artifact (and the job ran at -vvv).
    assert "ansible collection location = %s" % installed_collection in stdout
    secrets = {PASSWORD, quote(PASSWORD, safe="")}
    events = sorted((artifacts / "job_events").glob("*.json"))
    assert len(events) > 20
    for path in events:
        text = path.read_text()
        json.loads(text)
        assert not [s for s in secrets if s in text], "password in job event %s" % path.name
    for line in (res.stdout + stdout).splitlines():
        assert not [s for s in secrets if s in line], "password in the job's output"
    rows = scram.admin("SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history", db=db)
    assert rows == ",".join(VERSIONS)
    assert f"{USER}@127.0.0.1:{scram.port}/{db}" in stdout  # the target is named, without its password
