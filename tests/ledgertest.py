"""Helpers shared by tests/unit and tests/integration (no database here; one copy of each)."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args
from ansible_collections.arrakis.ledger.plugins.module_utils import (
    ledger_engine as engine,
)

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = ROOT / "files" / "migrations"
# The runbook's migrations (0008-0011), each with its down script. files/migrations may hold more:
# an operator following "Adding a migration" adds a 0012 of their own there, and the suite must
# still pass. Tests use RUNBOOK_SET (a copy of these four, their down scripts and .verify.json)
# or sets of their own, so a migration a test adds (0012 above the runbook's 0011) never meets
# the operator's.
VERSIONS = ["0008", "0009", "0010", "0011"]
UPS = sorted(p for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")
             if not p.name.endswith(".down.sql") and p.name[:4] in VERSIONS)


def _runbook_set():
    directory = Path(tempfile.mkdtemp(prefix="ledger-runbook-set-"))
    atexit.register(shutil.rmtree, directory, True)
    for version in VERSIONS:  # the up and down scripts and verify's .verify.json of each
        for path in MIGRATIONS.glob(version + "_*"):
            shutil.copy2(path, directory / path.name)
    return directory


def down_of(up: Path) -> Path:
    return up.with_name(up.name[:-4] + ".down.sql")


RUNBOOK_SET = _runbook_set()


def shipped_versions():
    """The versions of files/migrations, the roles' default set (the Molecule scenarios migrate it): the
    runbook's 0008-0011 and any of the operator's own above them. Read with the engine's file-name rule."""
    return [m.version for m in engine.load_migration_set(str(MIGRATIONS))]


def write_set(directory, files):
    """Write {filename: sql} into directory (dedented) and return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(textwrap.dedent(sql).lstrip("\n"))
    return directory


def load(directory):
    return engine.load_migration_set(str(directory))


# A small set used by the engine's tests: three migrations, each with a down script.
BASIC = {
    "0001_accounts.sql": """
        -- the first migration
        CREATE TABLE accounts (id integer PRIMARY KEY, name text NOT NULL);
        INSERT INTO accounts VALUES (1, 'one');
    """,
    "0001_accounts.down.sql": "DROP TABLE accounts;\n",
    "0002_entries.sql": """
        CREATE TABLE entries (id integer PRIMARY KEY, account_id integer REFERENCES accounts);
    """,
    "0002_entries.down.sql": "DROP TABLE entries;\n",
    "0003_entries_amount.sql": """
        ALTER TABLE entries ADD COLUMN amount bigint NOT NULL DEFAULT 0;
    """,
    "0003_entries_amount.down.sql": "ALTER TABLE entries DROP COLUMN amount;\n",
}


SECRET = "Inproc-s3cr3t-42"  # distinctive: any appearance in a result is a leak

inprocess = importlib.import_module("ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_inprocess")


def module(name):
    return inprocess.load_module(name)


def via_main(name, args, check_mode=False):
    """The module's own main() (AnsibleModule) on args: its JSON result."""
    params = dict(args, _ansible_module_name=name)
    if check_mode:
        params["_ansible_check_mode"] = True
    out = io.StringIO()
    with patch_module_args(params), contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit):
            module(name).main()
    return json.loads(out.getvalue())


def ledger_migrate_spec():
    import yaml

    return yaml.safe_load(module("ledger_migrate").DOCUMENTATION)["options"]
