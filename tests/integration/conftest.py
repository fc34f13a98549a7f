"""Shared pytest fixtures: one real PostgreSQL 15 per test session, fresh databases per test.

The cluster is started by scripts/pgcluster.py (the same code as `make sandbox` and
Molecule's create step) on a free port under a temporary directory, and destroyed
at the end of the session. Tests never touch the sandbox or any real target.

Under pytest-xdist (`make pytest` runs one worker per core) each worker is a session:
its own cluster, template, report directory and tmp_path tree. What a test must do to
be safe there (its own databases, files, ports; xdist_group for expensive module
fixtures) is in tests/README.md.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg2
import pytest
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = RUNBOOK_SET  # the runbook's 0008-0011, whatever else files/migrations holds
sys.path.insert(0, str(ROOT / "scripts"))

import pgcluster  # noqa: E402
import pgclusters  # noqa: E402

# Playbook runs from tests write their reports here, not into the checkout's reports/
# (one directory per process: each xdist worker has its own, removed when it exits).
if "LEDGER_REPORT_DIR" not in os.environ:
    os.environ["LEDGER_REPORT_DIR"] = tempfile.mkdtemp(prefix="ledger-test-reports-")
    atexit.register(shutil.rmtree, os.environ["LEDGER_REPORT_DIR"], True)


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
    """One PostgreSQL 15 for the whole session, or for each xdist worker (start-up is the expensive part)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="ledger-pytest-"))
    state = pgclusters.start(tmpdir / "pg", tmpdir=tmpdir)
    cluster = Cluster(Path(state["dir"]), state["port"])
    try:
        yield cluster
    finally:
        pgclusters.destroy(tmpdir / "pg")
        shutil.rmtree(tmpdir, ignore_errors=True)


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


@contextlib.contextmanager
def archiving_cluster(prefix: str, stanza: str):
    """(base, state) of a PostgreSQL 15 at 0011 archiving to a pgBackRest repository of its own (stanza
    `stanza`), in a temporary directory named `prefix...`; destroyed with the directory afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        state = pgclusters.start(base / "pg", tmpdir=base, archive="pgbackrest", stanza=stanza)
        apply_sql_files(state["url"])
        yield base, state
    finally:
        pgclusters.destroy(base / "pg")
        shutil.rmtree(base, ignore_errors=True)


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


@pytest.fixture
def su(ledger_db):
    """A superuser session on a ledger database (test_ledger_sql.Session), closed after the test."""
    from test_ledger_sql import Session
    s = Session(ledger_db)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def installed_collection(tmp_path_factory):
    """The collection as another team gets it: `ansible-galaxy collection build` of this checkout, then
    `ansible-galaxy collection install` of the artifact; yields the collections path to put first in
    ANSIBLE_COLLECTIONS_PATH (community.postgresql comes from the venv's bundled collections)."""
    base = tmp_path_factory.mktemp("collection")
    galaxy = str(Path(sys.executable).parent / "ansible-galaxy")
    (base / "ansible.cfg").write_text("[defaults]\n")  # not this project's ansible.cfg
    # A home of its own: Molecule's ansible-compat links this checkout into $ANSIBLE_HOME/collections,
    # and ansible-galaxy would then call the artifact "already installed".
    env = dict(os.environ, ANSIBLE_CONFIG=str(base / "ansible.cfg"), ANSIBLE_HOME=str(base / ".ansible"),
               ANSIBLE_NOCOLOR="1")
    subprocess.run([galaxy, "collection", "build", str(ROOT), "--output-path", str(base / "dist")],
                   check=True, capture_output=True, text=True, env=env, timeout=120)
    (artifact,) = (base / "dist").glob("arrakis-ledger-*.tar.gz")
    # --no-deps: community.postgresql is already there (bundled by the pinned ansible package); no Galaxy here.
    subprocess.run([galaxy, "collection", "install", str(artifact), "-p", str(base / "collections"), "--no-deps",
                    "--force"],
                   check=True, capture_output=True, text=True, env=env, timeout=120)
    path = base / "collections"
    assert (path / "ansible_collections" / "arrakis" / "ledger" / "MANIFEST.json").is_file()
    assert not (path / "ansible_collections" / "arrakis" / "ledger" / "tests").exists()  # tests stay out
    return path


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
