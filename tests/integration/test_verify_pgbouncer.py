"""ledger_verify through a real PgBouncer in transaction mode (scripts/pgbouncer_ctl.py, pool of
one server connection per database/user, so two clients' transactions must share it).

A context set with set_config(..., true) must not reach the next client's transaction; the
positive control shows that this pool would carry a session-level SET to the next client, so
the leak check can fail."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest

import pgbouncer_ctl
from ledgertest import via_main

ROOT = Path(__file__).resolve().parents[2]


def run_verify(url: str, **args) -> dict:
    return via_main("ledger_verify", dict(database_url=url, limit="testenv", **args))


def start_bouncer(base, pg_port, **kw):
    try:
        return pgbouncer_ctl.start(base, pg_port, install=True, **kw)
    except pgbouncer_ctl.BouncerError as exc:
        pytest.fail("cannot start PgBouncer: %s" % exc)


@pytest.fixture(scope="module")
def bouncer(pg_cluster, tmp_path_factory):
    """One PgBouncer (transaction mode, pool size 1) for the module."""
    base = tmp_path_factory.mktemp("pgbouncer")
    state = start_bouncer(base, pg_cluster.port, pool_size=1)
    try:
        yield state
    finally:
        pgbouncer_ctl.stop(base)


@pytest.fixture(scope="module")
def leaky_bouncer(pg_cluster, tmp_path_factory):
    """The same PgBouncer without server_reset_query_always: a configuration precheck refuses."""
    base = tmp_path_factory.mktemp("pgbouncer-leaky")
    state = start_bouncer(base, pg_cluster.port, pool_size=1, leaky=True)
    try:
        yield state
    finally:
        pgbouncer_ctl.stop(base)


def via(bouncer, direct_url: str) -> str:
    return pgbouncer_ctl.url(bouncer, db=direct_url.rsplit("/", 1)[1])


def admin(bouncer, command: str) -> list[tuple]:
    conn = psycopg2.connect(pgbouncer_ctl.url(bouncer, db="pgbouncer"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(command)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]
    finally:
        conn.close()


def test_pgbouncer_runs_in_transaction_mode(bouncer, ledger_db):
    config = {row["key"]: row["value"] for row in admin(bouncer, "SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    assert config["default_pool_size"] == "1"
    conn = psycopg2.connect(via(bouncer, ledger_db))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    pools = [p for p in admin(bouncer, "SHOW POOLS") if p["database"] == ledger_db.rsplit("/", 1)[1]]
    assert pools and pools[0]["pool_mode"] == "transaction"


def test_a_session_level_set_would_leak_through_a_pool_without_reset(leaky_bouncer, ledger_db):
    """Positive control: the pool shares one server connection, so without a server reset between
    clients a plain SET reaches client B (the shipped configuration resets: test_ledger_pooler.py)."""
    a = psycopg2.connect(via(leaky_bouncer, ledger_db))
    b = psycopg2.connect(via(leaky_bouncer, ledger_db))
    try:
        with a.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid_a = cur.fetchone()[0]
            cur.execute("SET app.community_id = '22222222-2222-2222-2222-222222222222'")
        a.commit()
        with b.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('app.community_id', true), app.current_community_id()")
            pid_b, seen, tenant = cur.fetchone()
            cur.execute("RESET app.community_id")
        b.commit()
    finally:
        a.close()
        b.close()
    assert pid_a == pid_b
    assert seen == "22222222-2222-2222-2222-222222222222" == str(tenant)


def test_verify_through_pgbouncer_passes(bouncer, ledger_db):
    result = run_verify(ledger_db, pgbouncer_url=via(bouncer, ledger_db))
    assert not result.get("failed"), result["msg"]
    pgb = {c["id"]: c for c in result["checks"] if c["group"] == "pgbouncer"}
    for cid in ("pgbouncer.guard_raises_p0001:app.current_community_id()",
                "pgbouncer.tenant_isolation:public.credit_lots",
                "pgbouncer.tenant_isolation:public.lot_balances",
                "pgbouncer.no_context_raises:public.usage_events",
                "pgbouncer.cross_tenant_insert_refused:public.crypto_payments",
                "pgbouncer.insert_without_context_refused:public.usage_events",
                "pgbouncer.context_does_not_leak:app.community_id"):
        assert pgb[cid]["status"] == "passed", pgb.get(cid)
    leak = pgb["pgbouncer.context_does_not_leak:app.community_id"]["observed"]
    assert "on the same server connection" in leak and "raised SQLSTATE P0001" in leak
    assert "through PgBouncer too" in result["msg"]


def test_session_level_context_function_is_caught_as_a_leak(leaky_bouncer, ledger_db):
    """An app.set_community_context() that used SET (session) instead of SET LOCAL."""
    conn = psycopg2.connect(ledger_db)
    with conn, conn.cursor() as cur:
        cur.execute("""CREATE OR REPLACE FUNCTION app.set_community_context(p_community_id uuid) RETURNS void
                       LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
                       BEGIN PERFORM pg_catalog.set_config('app.community_id', p_community_id::text, false); END $$""")
    conn.close()
    result = run_verify(ledger_db, pgbouncer_url=via(leaky_bouncer, ledger_db))
    assert result["failed"]
    assert "pgbouncer.context_does_not_leak:app.community_id" in result["failed_checks"]
    assert "app.current_community_id() returned" in result["msg"]
    assert "pool_mode = transaction" in result["msg"]  # the next step names the PgBouncer rule


def test_session_pooling_is_reported(pg_cluster, ledger_db, tmp_path):
    """Under session pooling client B never gets client A's server: the check says so."""
    state = start_bouncer(tmp_path / "session", pg_cluster.port, pool_size=2, pool_mode="session")
    try:
        result = run_verify(ledger_db, pgbouncer_url=via(state, ledger_db), leak_attempts=3)
    finally:
        pgbouncer_ctl.stop(tmp_path / "session")
    assert result["failed"]
    assert result["failed_checks"] == ["pgbouncer.context_does_not_leak:app.community_id"]
    assert "not in transaction pooling mode" in result["msg"]


def test_unreachable_pgbouncer_is_named(ledger_db):
    result = run_verify(ledger_db, pgbouncer_url="postgresql://postgres@127.0.0.1:1/nowhere")
    assert result["failed"]
    assert "pgbouncer.connect:postgres@127.0.0.1:1/nowhere" in result["failed_checks"]
