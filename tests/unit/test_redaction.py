"""Passwords never shown: unreachable targets, the passfile of the PostgreSQL tools; no database."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ansible_collections.arrakis.ledger.plugins.module_utils import (
    ledger_backup_utils as bu,
)

from ledgertest import SECRET, inprocess


def test_libpq_env_keeps_the_password_in_a_private_passfile():
    url = "postgresql://migrator:p%3Ass%5Cw@db.example:5432/ledger?sslmode=require"
    with bu.libpq_env(url) as (env, conninfo):
        assert conninfo == "postgresql://migrator@db.example:5432/ledger?sslmode=require"
        assert "PGPASSWORD" not in env
        passfile = env["PGPASSFILE"]
        assert stat.S_IMODE(os.stat(passfile).st_mode) == 0o600
        assert Path(passfile).read_text() == "*:*:*:*:p\\:ss\\\\w\n"
    assert not os.path.exists(passfile)


def test_a_password_in_database_url_never_reaches_the_result():
    url = "postgresql://someone:%s@127.0.0.1:1/nodb" % SECRET
    for name, extra in (("ledger_precheck", {}), ("ledger_verify", {}), ("ledger_backup", {"backup_dir": "/nonexistent"}),
                        ("ledger_migrate", {"migrations_dir": "/nonexistent", "action": "status"})):
        got = inprocess.call(name, dict(database_url=url, **extra), check_mode=False)
        assert got["failed"] is True, name
        assert SECRET not in json.dumps(got), name
        assert got["invocation"]["module_args"]["database_url"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
