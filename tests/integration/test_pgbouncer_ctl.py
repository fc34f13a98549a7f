"""scripts/pgbouncer_ctl.py: the PgBouncer that pytest and the Molecule `pgbouncer` scenario use."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

import pgbouncer_ctl

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pgbouncer_ctl.py"


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module", autouse=True)
def installed():
    try:
        pgbouncer_ctl.find_binary(install=True)
    except pgbouncer_ctl.BouncerError as exc:
        pytest.fail(str(exc))


def test_cli_start_status_url_stop(pg_cluster, tmp_path):
    base = tmp_path / "pgb"
    res = ctl("start", "--dir", str(base), "--pg-port", str(pg_cluster.port), "--pool-size", "1")
    assert res.returncode == 0, res.stderr
    assert "pool_mode=transaction" in res.stdout
    try:
        status = json.loads(ctl("status", "--dir", str(base)).stdout)
        assert status["running"] is True and status["pool_mode"] == "transaction" and status["pool_size"] == 1
        url = ctl("url", "--dir", str(base), "--db", "postgres").stdout.strip()
        assert url == "postgresql://postgres@127.0.0.1:%d/postgres" % status["port"]
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone()[0] == "postgres"
        conn.close()
        # Starting again is a no-op that reports the running instance.
        again = ctl("start", "--dir", str(base), "--pg-port", str(pg_cluster.port))
        assert again.returncode == 0 and str(status["port"]) in again.stdout
        # The userlist may hold passwords: private to pgbouncer's user.
        assert (Path(status["home"]) / "userlist.txt").stat().st_mode & 0o077 == 0
    finally:
        assert ctl("stop", "--dir", str(base)).returncode == 0
    assert ctl("status", "--dir", str(base)).returncode == 3
    assert not pgbouncer_ctl.port_in_use(status["port"])


def test_md5_auth_refuses_a_wrong_password(pg_cluster, tmp_path):
    state = pgbouncer_ctl.start(tmp_path / "md5", pg_cluster.port, auth="md5",
                                users={"postgres": "right-pw", "arrakis_app": "app-pw"})
    try:
        url = "postgresql://postgres:%s@127.0.0.1:%d/postgres"
        conn = psycopg2.connect(url % ("right-pw", state["port"]))
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(url % ("wrong-pw", state["port"]))
    finally:
        pgbouncer_ctl.stop(tmp_path / "md5")


def test_refuses_a_busy_port_and_a_missing_postgres(pg_cluster, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        res = ctl("start", "--dir", str(tmp_path / "a"), "--pg-port", str(pg_cluster.port), "--port", str(busy))
        assert res.returncode == 2 and "already in use" in res.stderr
    free = pgbouncer_ctl.free_port()
    res = ctl("start", "--dir", str(tmp_path / "b"), "--pg-port", str(free))
    assert res.returncode == 2 and "no PostgreSQL listening" in res.stderr
