"""The built collection, installed, used by a playbook outside this repository (another team's).

The artifact of `ansible-galaxy collection build` is installed with `ansible-galaxy collection
install` (conftest.installed_collection); a playbook in a directory of its own, with its own
inventory, migrations_dir and backup_dir and no ansible.cfg of ours, runs precheck, backup,
migrate and verify through the roles' FQCN against a database given by database_url.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ledgertest import RUNBOOK_SET, VERSIONS
from pghelpers import history, q

PLAYBOOK = {
    "name": "Migrate our ledger database with arrakis.ledger",
    "hosts": "ledger_databases",
    "gather_facts": False,
    "vars": {"migrations_dir": "{{ playbook_dir }}/migrations", "backup_dir": "{{ playbook_dir }}/backups",
             "report_dir": "{{ playbook_dir }}/reports"},
    "roles": ["arrakis.ledger.precheck", "arrakis.ledger.backup", "arrakis.ledger.migrate",
              "arrakis.ledger.verify"],
}


def test_an_outside_playbook_runs_the_installed_roles_by_fqcn(tmp_path, empty_db, installed_collection):
    team = tmp_path / "other-team"
    shutil.copytree(RUNBOOK_SET, team / "migrations")
    (team / "ansible.cfg").write_text("[defaults]\ngathering = explicit\n")  # the team's own, not ours
    (team / "site.yml").write_text(yaml.safe_dump([PLAYBOOK], sort_keys=False))
    (team / "hosts.yml").write_text(yaml.safe_dump({"ledger_databases": {"hosts": {"ledger-1": {
        "database_url": empty_db, "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    bundled = Path(sys.executable).parents[1] / "lib" / ("python%d.%d" % sys.version_info[:2]) / "site-packages"
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_COLLECTIONS_PATH="%s:%s" % (installed_collection, bundled),
               ANSIBLE_HOME=str(tmp_path / ".ansible"), ANSIBLE_CONFIG=str(team / "ansible.cfg"))
    env.pop("DATABASE_URL", None)
    res = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "hosts.yml", "site.yml", "-vvv"],
                         cwd=team, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    # The roles came from the installed artifact, not from this checkout.
    assert "ansible collection location = %s:%s" % (installed_collection, bundled) in res.stdout
    assert history(empty_db) == VERSIONS
    assert list((team / "backups").rglob("*.json")), "the backup and its manifest land in the team's backup_dir"
    assert q(empty_db, "SELECT count(*) FROM migrations.events WHERE action = 'verify' AND outcome = 'passed'")[0][0] == 1
