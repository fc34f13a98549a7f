"""No password leaves the process: not in output at -vvv, reports, manifests, events or errors.

A dedicated PostgreSQL 15 (scripts/pgcluster.py) whose pg_hba.conf asks for
scram-sha-256 on 127.0.0.1 makes the password real: without it no connection opens.
The pipeline then runs with that password in database_url (inventory, environment
and vault), succeeds, fails in a migration, meets a closed port and a wrong password,
and each time every byte it produced is searched for the password.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import pgcluster  # noqa: E402
import pgclusters  # noqa: E402
from ledgertest import RUNBOOK_SET
from port_block import free_port  # noqa: E402

ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
ANSIBLE_VAULT = str(Path(sys.executable).parent / "ansible-vault")
USER = "migrator"
PASSWORD = "Ldgr-" + secrets.token_hex(10)  # distinctive: any appearance is a leak
WRONG_PASSWORD = "Wrng-" + secrets.token_hex(10)


class ScramCluster:
    def __init__(self, base: Path, port: int):
        self.base, self.port = base, port

    def url(self, db: str, password: str | None = PASSWORD, port: int | None = None, query: str = "") -> str:
        auth = USER if password is None else f"{USER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{port or self.port}/{db}" + (f"?{query}" if query else "")

    def admin(self, sql: str, db: str = "postgres") -> str:
        home = pgcluster.server_home(self.base)
        return pgcluster.psql(pgcluster.find_bindir(), home, self.port, sql, db=db)


@pytest.fixture(scope="module")
def scram():
    tmpdir = Path(tempfile.mkdtemp(prefix="ledger-scram-"))
    base = tmpdir / "pg"
    state = pgclusters.start(base, tmpdir=tmpdir)
    cluster = ScramCluster(base.resolve(), state["port"])
    try:
        data = pgcluster.server_home(cluster.base) / "data"
        hba = data / "pg_hba.conf"
        # TCP on loopback needs the password; the socket stays trusted for the test's own setup.
        lines = [line.replace("trust", "scram-sha-256") if line.startswith("host") else line
                 for line in hba.read_text().splitlines()]
        hba.write_text("\n".join(lines) + "\n")
        cluster.admin(f"SET password_encryption = 'scram-sha-256'; "
                      f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        bindir = pgcluster.find_bindir()
        pgcluster._run([str(bindir / "pg_ctl"), "-D", str(data), "reload"])
        yield cluster
    finally:
        pgclusters.destroy(base)
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def db(scram):
    name = "s_" + uuid.uuid4().hex[:10]
    scram.admin(f'CREATE DATABASE "{name}" OWNER {USER}')
    try:
        yield name
    finally:
        scram.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def leaks(text: str) -> list[str]:
    return [secret for secret in (PASSWORD, WRONG_PASSWORD) if secret in text]


def assert_nothing_leaked(res: subprocess.CompletedProcess, tmp: Path, scram: ScramCluster | None = None,
                          db: str | None = None) -> None:
    """Search the run's output, every file it wrote, and the target's records."""
    assert not leaks(res.stdout + res.stderr), "password in ansible-playbook output"
    written = [p for p in tmp.rglob("*") if p.is_file() and p.suffix not in (".yml",)]
    for path in written:
        data = path.read_bytes().decode("utf-8", "replace")
        assert not leaks(data), f"password in {path.relative_to(tmp)}"
    if scram is not None and db is not None:
        dump = scram.admin("SELECT coalesce(string_agg(e::text, E'\\n'), '') FROM migrations.events e", db=db) \
            if scram.admin("SELECT to_regclass('migrations.events') IS NOT NULL", db=db) == "t" else ""
        assert not leaks(dump), "password in migrations.events"


def run(tmp: Path, *extra: str, host_vars: dict | None = None, env_url: str | None = None,
        inventory: str | None = None, limit: str = "all") -> subprocess.CompletedProcess:
    if inventory is None:
        inv = tmp / "inventory.yml"
        inv.write_text(yaml.safe_dump({"all": {"hosts": {"ledger-1": host_vars or {}}}}))
        inventory = str(inv)
    cmd = [ANSIBLE_PLAYBOOK, "playbooks/migrate.yml", "-i", inventory, "-l", limit, "-vvv",
           "-e", f"backup_dir={tmp / 'backups'}", "-e", f"report_dir={tmp / 'reports'}",
           "-e", f"migrations_dir={RUNBOOK_SET}", *extra]
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env.pop("DATABASE_URL", None)
    if env_url:
        env["DATABASE_URL"] = env_url
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_the_password_is_real(scram, db):
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(scram.url(db, password=None)).close()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(scram.url(db, password=WRONG_PASSWORD)).close()
    psycopg2.connect(scram.url(db)).close()


class ProcessWatcher(threading.Thread):
    """Reads every process's command line while a run goes on: pg_dump must not get the password in argv."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.leaked, self.seen = [], set()

    def run(self):
        while not self.stop.is_set():
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    argv = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                except OSError:
                    continue
                if argv:
                    self.seen.add(Path(argv.split(" ", 1)[0]).name)
                if leaks(argv):
                    self.leaked.append(argv.replace(PASSWORD, "<PASSWORD>"))
            time.sleep(0.005)


def test_a_full_run_at_vvv_shows_no_password(tmp_path, scram, db):
    watcher = ProcessWatcher()
    watcher.start()
    try:
        res = run(tmp_path, host_vars={"database_url": scram.url(db)})
    finally:
        watcher.stop.set()
        watcher.join()
    assert res.returncode == 0, res.stdout[-3000:]
    assert "pg_dump" in watcher.seen and not watcher.leaked, watcher.leaked  # not in any process's argv either
    assert list((tmp_path / "reports").glob("*.json")) and list((tmp_path / "backups").rglob("*.json"))
    assert f"{USER}@127.0.0.1:{scram.port}/{db}" in res.stdout  # the target is named, without its password
    assert_nothing_leaked(res, tmp_path, scram, db)


def test_a_password_from_the_environment_is_not_shown(tmp_path, scram, db):
    res = run(tmp_path, env_url=scram.url(db))  # the host sets nothing: DATABASE_URL is the default
    assert res.returncode == 0, res.stdout[-3000:]
    assert_nothing_leaked(res, tmp_path, scram, db)


def test_a_password_from_the_vault_is_not_shown(tmp_path, scram, db):
    vault_pass = tmp_path / "vault-pass"
    vault_pass.write_text(secrets.token_hex(16))
    enc = subprocess.run([ANSIBLE_VAULT, "encrypt_string", "--vault-password-file", str(vault_pass),
                          scram.url(db), "--name", "database_url"], capture_output=True, text=True, check=True)
    host_vars = tmp_path / "host_vars"
    host_vars.mkdir()
    (host_vars / "ledger-1.yml").write_text("---\n" + enc.stdout)
    inv = tmp_path / "hosts.yml"
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"ledger-1": None}}}))
    assert PASSWORD not in (host_vars / "ledger-1.yml").read_text()
    res = run(tmp_path, "--vault-password-file", str(vault_pass), inventory=str(inv))
    assert res.returncode == 0, res.stdout[-3000:]
    assert_nothing_leaked(res, tmp_path, scram, db)


def test_a_failing_migration_shows_no_password(tmp_path, scram, db):
    scram.admin("CREATE TABLE public.webhook_events (id integer)", db=db)  # 0010 fails: 42P07
    res = run(tmp_path, "-e", "precheck_rehearse=false", host_vars={"database_url": scram.url(db)})
    assert res.returncode != 0
    assert "42P07" in res.stdout
    assert_nothing_leaked(res, tmp_path, scram, db)


def test_a_closed_port_shows_no_password(tmp_path, scram, db):
    port = free_port()
    res = run(tmp_path, host_vars={"database_url": scram.url(db, port=port)})
    assert res.returncode != 0
    assert f"{USER}@127.0.0.1:{port}/{db}" in res.stdout  # the message names the target
    assert_nothing_leaked(res, tmp_path)


def test_a_wrong_password_shows_neither_password(tmp_path, scram, db):
    res = run(tmp_path, host_vars={"database_url": scram.url(db, password=WRONG_PASSWORD)})
    assert res.returncode != 0
    assert "password authentication failed" in res.stdout
    assert_nothing_leaked(res, tmp_path)


def test_sslmode_in_the_url_is_honoured(tmp_path, scram, db):
    # This server has no TLS: a URL that demands it must fail to connect, which shows libpq read it.
    res = run(tmp_path, host_vars={"database_url": scram.url(db, query="sslmode=require")})
    assert res.returncode != 0
    assert "does not support SSL" in res.stdout
    assert_nothing_leaked(res, tmp_path)


def test_production_refuses_a_url_without_verify_full(tmp_path, scram, db):
    # The real production inventory and group_vars; the URL comes from DATABASE_URL.
    res = run(tmp_path, "-e", "maintenance_window_ack=true", inventory="inventory/production",
              limit="production", env_url=scram.url(db, query="sslmode=require"))
    assert res.returncode != 0
    assert "requires sslmode=verify-full" in res.stdout and "sslmode=require" in res.stdout
    assert scram.admin("SELECT to_regclass('migrations.history') IS NULL", db=db) == "t"  # nothing ran
    [report] = [yaml.safe_load(p.read_text()) for p in (tmp_path / "reports").glob("*.json")]
    assert report["summary"]["failed"] == ["production-ledger"]
    assert "sslmode=verify-full" in report["targets"]["production-ledger"]["failure"]["msg"]
    assert_nothing_leaked(res, tmp_path)
    # With verify-full the check passes, and libpq then insists on TLS (which this server lacks).
    res = run(tmp_path, "-e", "maintenance_window_ack=true", inventory="inventory/production",
              limit="production", env_url=scram.url(db, query="sslmode=verify-full"))
    assert res.returncode != 0
    assert "requires sslmode=verify-full" not in res.stdout
    assert "does not support SSL" in res.stdout or "root certificate" in res.stdout
    assert_nothing_leaked(res, tmp_path)


def test_a_raw_at_in_the_password_is_refused_before_anything_is_shown(tmp_path, scram, db):
    # Unencoded, libpq would read "Zq7" as the password and "Wx9k@127.0.0.1" as the host; the pieces
    # are distinctive so that any appearance is a leak.
    url = f"postgresql://{USER}:Zq7@Wx9k@127.0.0.1:{scram.port}/{db}"
    res = run(tmp_path, host_vars={"database_url": url})
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "percent-encode" in out and "%40" in out
    for piece in ("Zq7", "Wx9k"):
        assert piece not in out, piece
        for path in (p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".yml"):
            assert piece not in path.read_text(errors="replace"), (piece, path)
    assert scram.admin("SELECT to_regclass('migrations.history') IS NULL", db=db) == "t"  # nothing ran
