"""Guarantee 7 through a real PgBouncer in transaction mode (scripts/pgbouncer_ctl.py, one server
connection per pool, so consecutive clients must share it): one client's session-level context
(`SET app.community_id`, `set_config(..., false)`, a startup option) never gives another
client's transaction access to that tenant.

The ledger's choice: the pooler configuration the project ships (pgbouncer_ctl.py; precheck
refuses anything else) resets every server connection after each client transaction
(server_reset_query = DISCARD ALL, server_reset_query_always = 1). The database alone cannot
tell `SET LOCAL app.community_id` (the application's contract) from a session-level SET.
The control runs the same leak against a PgBouncer without the reset and sees it.
"""

from __future__ import annotations

import psycopg2
import pytest
from ledger_app import HOW, App, new_tenant

import pgbouncer_ctl


def mint(url, tenant):
    app = App(url)
    try:
        app.mint(tenant, 1_000_000)
    finally:
        app.close()


def start(base, pg_port, **kw):
    try:
        return pgbouncer_ctl.start(base, pg_port, install=True, pool_size=1, **kw)
    except pgbouncer_ctl.BouncerError as exc:
        pytest.fail("cannot start PgBouncer: %s" % exc)


@pytest.fixture(scope="module")
def shipped(pg_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("pgb-shipped")
    state = start(base, pg_cluster.port)
    try:
        yield state
    finally:
        pgbouncer_ctl.stop(base)


@pytest.fixture(scope="module")
def leaky(pg_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("pgb-leaky")
    state = start(base, pg_cluster.port, leaky=True)
    try:
        yield state
    finally:
        pgbouncer_ctl.stop(base)


def via(state, url, user="arrakis_app", options=None):
    out = pgbouncer_ctl.url(state, user=user, db=url.rsplit("/", 1)[1])
    return out + ("?options=" + options.replace(" ", "%20").replace("=", "%3D") if options else "")


LEAKS = {
    "SET": "SET app.community_id = '{t}'",
    "set_config_false": "SELECT set_config('app.community_id', '{t}', false)",
    "SET_inside_a_transaction": "BEGIN; SET app.community_id = '{t}'; COMMIT",
    "startup_option": None,
}


def attempt_leak(state, url, how, tenant):
    """Client A sets tenant's context at session level; client B's next transaction reads the ledger.
    Returns (same server connection?, what B's read did)."""
    options = f"-c app.community_id={tenant}" if how == "startup_option" else None
    a = psycopg2.connect(via(state, url, options=options))
    b = psycopg2.connect(via(state, url))
    a.autocommit = True
    try:
        with a.cursor() as cur:
            if LEAKS[how]:
                cur.execute(LEAKS[how].format(t=tenant))
            cur.execute("SELECT pg_backend_pid()")
            pid_a = cur.fetchone()[0]
        with b.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid_b = cur.fetchone()[0]
            try:
                cur.execute("SELECT count(*) FROM public.credit_lots")
                seen = ("rows", cur.fetchone()[0])
            except psycopg2.Error as exc:
                seen = ("error", exc.pgcode)
        b.rollback()
        return pid_a == pid_b, seen
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", sorted(LEAKS))
def test_a_session_level_context_never_reaches_the_next_client(shipped, ledger_db, how):
    tenant = new_tenant()
    mint(ledger_db, tenant)
    same, seen = attempt_leak(shipped, ledger_db, how, tenant)
    assert same, "the two clients did not share the pool's only server connection"
    assert seen == ("error", "P0001"), seen


@pytest.mark.parametrize("how", ["SET", "set_config_false", "SET_inside_a_transaction"])
def test_control_without_the_reset_the_context_leaks(leaky, ledger_db, how):
    tenant = new_tenant()
    mint(ledger_db, tenant)
    same, seen = attempt_leak(leaky, ledger_db, how, tenant)
    assert same and seen == ("rows", 1), seen  # client B read tenant's lot without setting a context


@pytest.mark.parametrize("how", HOW)
def test_the_flows_work_through_pgbouncer_with_both_ways_of_setting_the_context(shipped, ledger_db, how):
    tenant, other = new_tenant(), new_tenant()
    pooled = App(via(shipped, ledger_db, user="postgres"), how)
    try:
        lot = pooled.mint(tenant, 2_000_000, payment_id=f"pgb-{how}")
        assert pooled.mint(tenant, 2_000_000, payment_id=f"pgb-{how}") is None
        pooled.mint(other, 5_000_000)
        assert pooled.debit(tenant, 2_000_000, "r1") == 2_000_000
        assert pooled.run("SELECT status, remaining_micro FROM public.lot_balances WHERE lot_id = %s", (lot,),
                          tenant=tenant) == [("depleted", 0)]
        # The next transaction on the same pooled client, without a context: loud.
        assert pooled.fails("SELECT count(*) FROM public.lot_balances").pgcode == "P0001"
        assert pooled.run("SELECT count(*) FROM public.credit_lots", tenant=other) == [(1,)]
    finally:
        pooled.close()
