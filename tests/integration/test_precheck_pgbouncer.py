"""The runbook's "check PgBouncer stats": SHOW POOLS on a real PgBouncer (Debian package) in front of
the session's PostgreSQL 15, with one server connection per pool so that a second client must wait."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

import pgbouncer_ctl
from test_precheck import by_name, run


@pytest.fixture
def bouncer(pg_cluster, tmp_path):
    try:
        pgbouncer_ctl.find_binary()
    except pgbouncer_ctl.BouncerError as exc:
        pytest.skip(f"pgbouncer is not installed: {exc}")
    state = pgbouncer_ctl.start(tmp_path / "bouncer", pg_cluster.port, pool_size=1)
    try:
        yield state
    finally:
        pgbouncer_ctl.stop(tmp_path / "bouncer")


def test_waiting_pgbouncer_clients_refuse_the_run(empty_db, bouncer):
    dbname = empty_db.rsplit("/", 1)[1]
    admin_url = pgbouncer_ctl.url(bouncer, db="pgbouncer")
    calm = run(empty_db, pgbouncer_admin_url=admin_url)
    assert not calm["failed"], calm["msg"]
    assert by_name(calm)["pgbouncer"]["observed"]["cl_waiting"] == 0

    holder = psycopg2.connect(pgbouncer_ctl.url(bouncer, db=dbname))
    waiter = psycopg2.connect(pgbouncer_ctl.url(bouncer, db=dbname))
    waiter.autocommit = True
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1")  # a transaction holds the pool's only server connection
        worker = threading.Thread(target=lambda: waiter.cursor().execute("SELECT 1"))
        worker.start()
        time.sleep(0.5)
        result = run(empty_db, pgbouncer_admin_url=admin_url)
        check = by_name(result)["pgbouncer"]
        assert result["failed_checks"] == ["pgbouncer"], result["msg"]
        assert check["observed"]["cl_waiting"] >= 1 and check["observed"]["sv_active"] >= 1
        assert any(o["database"] == dbname for o in check["offenders"])
        assert "waiting for a server connection" in result["msg"]
        holder.commit()
        worker.join(10)
    finally:
        holder.close()
        waiter.close()


def test_unreachable_pgbouncer_is_a_refusal_not_a_traceback(empty_db):
    result = run(empty_db, pgbouncer_admin_url="postgresql://postgres:pw@127.0.0.1:1/pgbouncer", connect_timeout=2)
    assert result["failed_checks"] == ["pgbouncer"]
    assert "cannot reach PgBouncer" in result["msg"] and "pw@" not in result["msg"]


def test_pgbouncer_that_would_leak_a_tenant_context_is_refused(empty_db, pg_cluster, tmp_path):
    """Guarantee 7: a transaction-mode PgBouncer without server_reset_query_always would carry a
    session-level SET app.community_id to the next client; the precheck refuses it, names the
    settings and says what to change. The shipped configuration (scripts/pgbouncer_ctl.py) passes."""
    try:
        pgbouncer_ctl.find_binary()
    except pgbouncer_ctl.BouncerError as exc:
        pytest.skip(f"pgbouncer is not installed: {exc}")
    state = pgbouncer_ctl.start(tmp_path / "leaky", pg_cluster.port, pool_size=1, leaky=True)
    try:
        result = run(empty_db, pgbouncer_admin_url=pgbouncer_ctl.url(state, db="pgbouncer"))
    finally:
        pgbouncer_ctl.stop(tmp_path / "leaky")
    assert result["failed_checks"] == ["pgbouncer"], result["msg"]
    assert "does not reset server connections between clients" in result["msg"]
    assert "server_reset_query_always = 1" in result["msg"]
