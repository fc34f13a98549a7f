"""Shared pytest fixtures: one real PostgreSQL 15 per test session, fresh databases per test.

The cluster is started by scripts/pgcluster.py (the same code as `make sandbox` and
Molecule's create step) on a free port under a temporary directory, and destroyed
at the end of the session. Tests never touch the sandbox or any real target.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "files" / "migrations"
sys.path.insert(0, str(ROOT / "scripts"))

import pgcluster  # noqa: E402

# Playbook runs from tests write their reports here, not into the checkout's reports/.
os.environ.setdefault("LEDGER_REPORT_DIR", tempfile.mkdtemp(prefix="ledger-test-reports-"))


def _load_module_utils():
    """Expose plugins/module_utils/*.py as ansible.module_utils.* (as Ansible does at run time)."""
    import ansible.module_utils as amu

    # ledger_common first: the others import it.
    paths = sorted((ROOT / "plugins" / "module_utils").glob("*.py"), key=lambda p: (p.stem != "ledger_common", p.stem))
    for path in paths:
        name = "ansible.module_utils." + path.stem
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(amu, path.stem, mod)


_load_module_utils()


class Cluster:
    """A running throwaway cluster: helpers to make databases and URLs."""

    def __init__(self, base: Path, port: int):
        self.base = base
        self.port = port
        self.bindir = Path(pgcluster.find_bindir())

    def url(self, db: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str = "postgres", autocommit: bool = True, **kw):
        conn = psycopg2.connect(self.url(db, **kw))
        conn.autocommit = autocommit
        return conn

    def create_db(self, name: str | None = None, template: str | None = None) -> str:
        name = name or "t_" + uuid.uuid4().hex[:10]
        # Not `with conn`: psycopg2 opens a transaction there, and CREATE DATABASE refuses one.
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                tmpl = f' TEMPLATE "{template}"' if template else ""
                cur.execute(f'CREATE DATABASE "{name}"{tmpl}')
        finally:
            conn.close()
        return name

    def drop_db(self, name: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()

    def bin(self, name: str) -> str:
        return str(self.bindir / name)


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL 15 for the whole session (start-up is the expensive part)."""
    base = Path(tempfile.mkdtemp(prefix="ledger-pytest-"))
    port = pgcluster.free_port()
    pgcluster.start(base / "pg", port, "ledger")
    cluster = Cluster((base / "pg").resolve(), port)
    try:
        yield cluster
    finally:
        pgcluster.destroy(base / "pg")


@pytest.fixture
def empty_db(pg_cluster):
    """A fresh empty database, dropped after the test; yields its URL."""
    name = pg_cluster.create_db()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_db(name)


def apply_sql_files(url: str, up_to: str | None = None) -> None:
    """Apply the up scripts with plain psycopg2, one transaction each (independent of the engine)."""
    conn = psycopg2.connect(url)
    try:
        for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            if path.name.endswith(".down.sql"):
                continue
            if up_to and path.name[:4] > up_to:
                break
            with conn, conn.cursor() as cur:
                cur.execute(path.read_text())
    finally:
        conn.close()


@pytest.fixture(scope="session")
def ledger_template(pg_cluster):
    """A database with 0008-0011 applied, used as a template for per-test copies."""
    name = pg_cluster.create_db("ledger_template")
    apply_sql_files(pg_cluster.url(name))
    return name


@pytest.fixture
def ledger_db(pg_cluster, ledger_template):
    """A fresh database at version 0011 (a copy of the template); yields its URL."""
    name = pg_cluster.create_db(template=ledger_template)
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_db(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With LEDGER_REQUIRE_PGBOUNCER=1 (set by .ci/run, which installs both), a test that
    skips for want of PgBouncer or pgBackRest fails instead: CI must prove those claims."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("LEDGER_REQUIRE_PGBOUNCER") == "1":
        reason = str(report.longrepr).lower()
        if "pgbouncer" in reason or "pgbackrest" in reason:
            report.outcome = "failed"
            report.longrepr = "PgBouncer and pgBackRest are required here (LEDGER_REQUIRE_PGBOUNCER=1) but the test skipped: " + reason
