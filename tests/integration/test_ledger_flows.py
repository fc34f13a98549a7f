"""Issue 12: the application's eight flows as `arrakis_app`, and the money guarantees, on a real
PostgreSQL 15 with two tenants' real rows.

Every flow runs twice: with `SELECT app.set_community_context($1)` and with a literal
`SET LOCAL app.community_id = '<uuid>'`. The superuser session (`su`) stands for the owner /
a DBA: it bypasses RLS, not the triggers and constraints, so "whoever writes" is proven with
it. Racing sessions are in test_ledger_races.py, the pooler in test_ledger_pooler.py.
"""

from __future__ import annotations

import uuid

import pytest
from ledger_app import HOW, App, new_tenant

MAX = 10**15  # the largest amount of a lot or an entry (micro-USD)


@pytest.fixture(params=HOW)
def app(request, ledger_db):
    a = App(ledger_db, request.param)
    try:
        yield a
    finally:
        a.close()


def balance(su, lot):
    return su.one("SELECT original_micro, credited_micro, debited_micro, remaining_micro"
                  " FROM public.lot_balances WHERE lot_id = %s", (lot,))


# --- Flow 1: mint --------------------------------------------------------------------------------

def test_mint_once_per_payment_and_lots_without_payment(app, su):
    a, b = new_tenant(), new_tenant()
    lot = app.mint(a, 5_000_000, payment_id="pay-1", expires_at="2999-01-01")
    assert lot and balance(su, lot) == (5_000_000, 5_000_000, 0, 5_000_000)
    # A retried webhook mints nothing, in this tenant or another.
    assert app.mint(a, 5_000_000, payment_id="pay-1") is None
    assert app.mint(b, 5_000_000, payment_id="pay-1") is None
    assert su.one("SELECT count(*) FROM public.credit_lots WHERE payment_id = 'pay-1'") == 1
    assert app.mint(a, 1, source="grant") and app.mint(a, 1, source="grant")
    assert su.one("SELECT count(*) FROM public.credit_lots WHERE community_id = %s", (str(a),)) == 3


# --- Flow 2: debit ------------------------------------------------------------------------------

def test_debit_locks_debits_and_depletes(app, su):
    a, b = new_tenant(), new_tenant()
    early = app.mint(a, 3_000_000, expires_at="2990-01-01")
    late = app.mint(a, 5_000_000, expires_at="2999-01-01")
    other = app.mint(b, 9_000_000)
    # 4 units over two lots: the earliest expiry first, fully used and marked depleted.
    assert app.debit(a, 4_000_000, "res-1") == 4_000_000
    assert balance(su, early) == (3_000_000, 3_000_000, 3_000_000, 0)
    assert balance(su, late)[3] == 4_000_000
    assert su.one("SELECT status FROM public.credit_lots WHERE id = %s", (early,)) == "depleted"
    # Idempotent per reservation: the same reservation again debits nothing more.
    app.debit(a, 1_000_000, "res-1")
    assert balance(su, late)[3] == 4_000_000
    # Marking an already depleted lot again is a harmless no-op (as in the application's SQL).
    app.run("SELECT app.update_lot_status(%s, 'depleted')", (early,), tenant=a)
    app.run("SELECT app.update_lot_status(%s, 'expired')", (early,), tenant=a)
    assert su.one("SELECT status FROM public.credit_lots WHERE id = %s", (early,)) == "depleted"
    # Tenant A's debit never touches B's lot; asking for more than A has debits what there is.
    assert app.debit(a, 10_000_000, "res-2") == 4_000_000
    assert balance(su, other)[3] == 9_000_000


def test_the_lock_takes_only_what_row_locks_need(app, su):
    a = new_tenant()
    lot = app.mint(a, 1_000_000)
    with app.tx(a) as cur:
        cur.execute("SELECT l.id FROM public.lot_balances b JOIN public.credit_lots l ON l.id = b.lot_id"
                    " WHERE b.remaining_micro > 0 FOR UPDATE OF l")
        assert [r[0] for r in cur.fetchall()] == [lot]
        cur.execute("SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND relation = 'public.credit_lots'::regclass")
        assert {r[0] for r in cur.fetchall()} <= {"AccessShareLock", "RowShareLock"}  # no table lock an INSERT waits for
    # The privilege that makes FOR UPDATE possible changes nothing by itself.
    for stmt in ("UPDATE public.credit_lots SET status = 'depleted'", "UPDATE public.credit_lots SET status = 'active'"):
        assert app.fails(stmt, tenant=a).pgcode == "P0002"
    for stmt in ("UPDATE public.credit_lots SET amount_micro = 1", "DELETE FROM public.credit_lots",
                 "UPDATE public.credit_lot_balances SET debited_micro = 0"):
        assert app.fails(stmt, tenant=a).pgcode == "42501", stmt
    assert su.one("SELECT status FROM public.credit_lots WHERE id = %s", (lot,)) == "active"


# --- Flow 3: expiry sweep -----------------------------------------------------------------------

def test_expiry_sweep(app, su):
    a = new_tenant()
    lot = app.mint(a, 2_000_000, source="grant", expires_at="2000-01-01")
    app.debit(a, 500_000, "r")
    assert app.expire(a, lot) == 1_500_000
    assert balance(su, lot) == (2_000_000, 2_000_000, 2_000_000, 0)
    assert su.one("SELECT status FROM public.credit_lots WHERE id = %s", (lot,)) == "expired"
    assert app.expire(a, lot) == 0  # a second sweep: nothing left, the status stays (no-op)


# --- Flow 4: payments ---------------------------------------------------------------------------

def test_payment_created_before_its_payment_id(app, su):
    a = new_tenant()
    pid = app.run("INSERT INTO public.crypto_payments (community_id, amount_usd) VALUES (%s, 12.50) RETURNING id",
                  (str(a),), tenant=a)[0][0]
    assert app.run("UPDATE public.crypto_payments SET payment_id = 'np-77' WHERE id = %s AND payment_id IS NULL",
                   (pid,), tenant=a) == 1
    created = su.one("SELECT created_at FROM public.crypto_payments WHERE id = %s", (pid,))
    upd = "UPDATE public.crypto_payments SET status = %s, updated_at = NOW() WHERE payment_id = %s"
    for status in ("confirming", "finished"):
        assert app.run(upd, (status, "np-77"), tenant=a) == 1
    # The application writes updated_at itself: accepted, and the trigger keeps its own value.
    app.run("UPDATE public.crypto_payments SET updated_at = '2000-01-01' WHERE payment_id = 'np-77'", tenant=a)
    status, updated = su.one("SELECT status, updated_at FROM public.crypto_payments WHERE id = %s", (pid,))
    assert status == "finished" and updated > created
    # payment_id is set once.
    for new in ("np-78", None):
        err = app.fails("UPDATE public.crypto_payments SET payment_id = %s WHERE id = %s", (new, pid), tenant=a)
        assert err.pgcode == "P0002" and "set once" in err.pgerror
        assert su.fails("UPDATE public.crypto_payments SET payment_id = %s WHERE id = %s", (new, pid)).pgcode == "P0002"
    # Several payments may wait for their id at once.
    app.run("INSERT INTO public.crypto_payments (community_id, amount_usd) VALUES (%s, 1), (%s, 2)",
            (str(a), str(a)), tenant=a)


# Guarantee 3: forward only; after finished only refunded; expired, failed, refunded are final.
STATUSES = ["waiting", "confirming", "confirmed", "sending", "partially_paid", "finished", "expired", "failed",
            "refunded"]


def allowed(old, new):
    if old == new:
        return True
    if old in ("expired", "failed", "refunded"):
        return False
    if old == "finished":
        return new == "refunded"
    return STATUSES.index(new) > STATUSES.index(old)


@pytest.mark.parametrize("old", STATUSES)
def test_payment_status_transitions_for_app_and_owner(ledger_db, su, old):
    a = new_tenant()
    app = App(ledger_db)
    try:
        for new in STATUSES:
            for who in ("app", "owner"):
                pay = f"p-{uuid.uuid4().hex[:8]}"
                app.run("INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd, status)"
                        " VALUES (%s, %s, 1, %s)", (str(a), pay, old), tenant=a)
                stmt = "UPDATE public.crypto_payments SET status = %s, updated_at = NOW() WHERE payment_id = %s"
                if allowed(old, new):
                    n = app.run(stmt, (new, pay), tenant=a) if who == "app" else su.run(stmt, (new, pay))
                    assert n == 1, (who, old, new)
                else:
                    err = app.fails(stmt, (new, pay), tenant=a) if who == "app" else su.fails(stmt, (new, pay))
                    assert err.pgcode == "23514" and f"cannot move from {old}" in err.pgerror, (who, old, new)
                assert su.one("SELECT status, status_rank FROM public.crypto_payments WHERE payment_id = %s",
                              (pay,)) == ((new, STATUSES.index(new)) if allowed(old, new) else (old, STATUSES.index(old)))
    finally:
        app.close()


# --- Flow 5: usage --------------------------------------------------------------------------------

def test_usage_once_per_finalization(app, su):
    a = new_tenant()
    ins = ("INSERT INTO public.usage_events (community_id, tokens_input, tokens_output, amount_micro, finalization_id)"
           " VALUES (%s, 10, 5, 1500, %s) ON CONFLICT (finalization_id) DO NOTHING")
    assert app.run(ins, (str(a), "fin-1"), tenant=a) == 1
    assert app.run(ins, (str(a), "fin-1"), tenant=a) == 0
    assert app.run("SELECT sum(amount_micro) FROM public.usage_events", tenant=a) == [(1500,)]


# --- Flow 6: the reconciler, a service without a tenant ---------------------------------------------

def test_reconciler_without_a_tenant_context(app, su):
    a, b = new_tenant(), new_tenant()
    upsert = ("INSERT INTO public.reconciliation_cursor (community_id, last_fence_token) VALUES (%s, %s)"
              " ON CONFLICT (community_id) DO UPDATE SET last_fence_token = EXCLUDED.last_fence_token,"
              " updated_at = now() WHERE reconciliation_cursor.last_fence_token < EXCLUDED.last_fence_token")
    cas = ("UPDATE public.reconciliation_cursor SET last_fence_token = %s, last_reconciled_at = now()"
           " WHERE community_id = %s AND last_fence_token < %s")
    for tenant in (a, b):
        assert app.run(upsert, (str(tenant), 1)) == 1
    assert app.run(cas, (5, str(a), 5)) == 1
    assert app.run(cas, (4, str(a), 4)) == 0          # a stale worker changes nothing
    assert app.run(upsert, (str(a), 3)) == 0
    rows = app.run("SELECT community_id, last_fence_token FROM public.reconciliation_cursor ORDER BY last_fence_token")
    assert rows == [(str(b), 1), (str(a), 5)]


# Guarantee 4: the fence never moves back, whatever statement is sent, by whoever.
def test_fence_never_moves_back(app, su):
    a = new_tenant()
    app.run("INSERT INTO public.reconciliation_cursor (community_id, last_fence_token) VALUES (%s, 7)", (str(a),))
    for stmt in ("UPDATE public.reconciliation_cursor SET last_fence_token = 6 WHERE community_id = %s",
                 "UPDATE public.reconciliation_cursor SET last_fence_token = 0 WHERE community_id = %s",
                 "INSERT INTO public.reconciliation_cursor (community_id, last_fence_token) VALUES (%s, 1)"
                 " ON CONFLICT (community_id) DO UPDATE SET last_fence_token = EXCLUDED.last_fence_token"):
        for runner in (app, su):
            err = runner.fails(stmt, (str(a),))
            assert err.pgcode == "23514" and "cannot move back from 7" in err.pgerror, err.pgerror
    assert su.fails("UPDATE public.reconciliation_cursor SET community_id = gen_random_uuid()").pgcode == "P0002"
    assert app.run("UPDATE public.reconciliation_cursor SET last_fence_token = 7, drift_micro = 3"
                   " WHERE community_id = %s", (str(a),)) == 1  # the same fence: other columns may move
    assert su.one("SELECT last_fence_token FROM public.reconciliation_cursor WHERE community_id = %s", (str(a),)) == 7


# --- Flow 7: keys ---------------------------------------------------------------------------------

def test_keys_publish_list_revoke(app, su):
    ins = ("INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer) VALUES (%s, 'x1', 'y1', %s)"
           " ON CONFLICT (kid) DO NOTHING")
    assert app.run(ins, ("k1", "finn")) == 1
    assert app.run(ins, ("k1", "finn")) == 0
    app.run(ins, ("k2", "finn"))
    active = ("SELECT kid FROM public.s2s_jwks_public_keys WHERE issuer = 'finn' AND revoked_at IS NULL"
              " AND (expires_at IS NULL OR expires_at > now()) ORDER BY kid")
    assert app.run(active) == [("k1",), ("k2",)]
    assert app.run("UPDATE public.s2s_jwks_public_keys SET revoked_at = NOW() WHERE kid = $1".replace("$1", "%s"),
                   ("k1",)) == 1
    assert app.run(active) == [("k2",)]
    first = su.one("SELECT revoked_at FROM public.s2s_jwks_public_keys WHERE kid = 'k1'")
    # Guarantee 5: revoked once (a second revoke keeps the first time), never cleared; material and issuer fixed.
    app.run("UPDATE public.s2s_jwks_public_keys SET revoked_at = NOW() + interval '1 day' WHERE kid = 'k1'")
    su.run("UPDATE public.s2s_jwks_public_keys SET revoked_at = NOW() + interval '2 days' WHERE kid = 'k1'")
    assert su.one("SELECT revoked_at FROM public.s2s_jwks_public_keys WHERE kid = 'k1'") == first
    for runner in (app, su):
        err = runner.fails("UPDATE public.s2s_jwks_public_keys SET revoked_at = NULL WHERE kid = 'k1'")
        assert err.pgcode == "P0002" and "never cleared" in err.pgerror
    for col, val in (("x", "evil"), ("y", "evil"), ("issuer", "freeside"), ("kid", "k9"), ("created_at", "2000-01-01")):
        err = su.fails(f"UPDATE public.s2s_jwks_public_keys SET {col} = %s WHERE kid = 'k2'", (val,))
        assert err.pgcode == "P0002" and "never change" in err.pgerror, (col, err.pgerror)
        assert app.fails(f"UPDATE public.s2s_jwks_public_keys SET {col} = %s WHERE kid = 'k2'",
                         (val,)).pgcode == "42501"
    assert su.one("SELECT x, y, issuer FROM public.s2s_jwks_public_keys WHERE kid = 'k2'") == ("x1", "y1", "finn")


# --- Flow 8: without a tenant context, loudly ---------------------------------------------------------

TENANT_READS = ["credit_lots", "lot_entries", "credit_lot_balances", "lot_balances", "crypto_payments", "usage_events"]
NO_CONTEXT_WRITES = [
    "INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (gen_random_uuid(), 'seed', 1)",
    "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
    " SELECT gen_random_uuid(), 'seed', 1 WHERE false",
    "INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
    " SELECT id, community_id, 'debit', 1 FROM public.credit_lots",
    "INSERT INTO public.crypto_payments (community_id, amount_usd) SELECT gen_random_uuid(), 1 WHERE false",
    "INSERT INTO public.usage_events (community_id) SELECT gen_random_uuid() WHERE false",
    "UPDATE public.crypto_payments SET status = 'finished', updated_at = NOW() WHERE payment_id = 'x'",
    "UPDATE public.credit_lots SET status = 'expired' WHERE false",
    "SELECT app.update_lot_status(gen_random_uuid(), 'expired')",
]


@pytest.mark.parametrize("populated", [False, True], ids=["empty", "populated"])
def test_no_context_every_read_and_write_raises_p0001(ledger_db, populated):
    for how in HOW:
        app = App(ledger_db, how)
        try:
            if populated:
                app.mint(new_tenant(), 1_000_000)
            # A transaction that set a context and committed leaves '' (or nothing) behind.
            app.run("SELECT 1", tenant=new_tenant())
            for rel in TENANT_READS:
                err = app.fails(f"SELECT count(*) FROM public.{rel}")
                assert err.pgcode == "P0001" and "app.community_id is not set" in err.pgerror, (how, rel, err.pgerror)
            for stmt in NO_CONTEXT_WRITES:
                err = app.fails(stmt)
                assert err.pgcode == "P0001" and "app.community_id" in err.pgerror, (how, stmt, err.pgerror)
        finally:
            app.close()


def test_services_without_a_tenant_may_use_the_global_tables(ledger_db):
    app = App(ledger_db)
    try:
        app.run("INSERT INTO public.webhook_events (provider, event_id) VALUES ('x402', 'e1')"
                " ON CONFLICT (provider, event_id) DO NOTHING")
        assert app.run("SELECT count(*) FROM public.webhook_events") == [(1,)]
        assert app.run("SELECT count(*) FROM public.s2s_jwks_public_keys") == [(0,)]
        assert app.run("SELECT count(*) FROM public.reconciliation_cursor") == [(0,)]
    finally:
        app.close()


# --- Guarantee 1 (single session): never overdrawn, never over-credited, whoever writes ---------------

ENTRY = "INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro) VALUES (%s, %s, %s, %s)"


@pytest.mark.parametrize("who", ["app", "owner"])
def test_a_lot_is_never_overdrawn_or_over_credited(app, su, who):
    a = new_tenant()
    lot = app.mint(a, 1_000_000)

    def write(kind, amount):
        if who == "app":
            return app.run(ENTRY, (lot, str(a), kind, amount), tenant=a)
        return su.run(ENTRY, (lot, str(a), kind, amount))

    def refused(kind, amount, words):
        err = app.fails(ENTRY, (lot, str(a), kind, amount), tenant=a) if who == "app" \
            else su.fails(ENTRY, (lot, str(a), kind, amount))
        assert err.pgcode == "23514", err.pgerror
        assert str(lot) in err.pgerror and f"{kind} of {amount} micro refused" in err.pgerror and words in err.pgerror
        assert err.diag.constraint_name == "credit_lot_balances_remaining_micro_check"

    refused("credit", 1, "exceed the lot's amount 1000000")       # the mint credited it all already
    refused("credit_back", 1, "exceed what was debited 0")
    write("debit", 600_000)
    refused("debit", 400_001, "only 400000 remaining")
    refused("expiry", 400_001, "only 400000 remaining")
    refused("credit_back", 600_001, "exceed what was debited 600000")
    write("credit_back", 100_000)
    write("expiry", 500_000)
    refused("debit", 1, "only 0 remaining")
    assert balance(su, lot) == (1_000_000, 1_100_000, 1_100_000, 0)
    # The balance matches the journal.
    assert su.one("SELECT sum(CASE WHEN entry_type IN ('credit', 'credit_back') THEN amount_micro"
                  " ELSE -amount_micro END) FROM public.lot_entries WHERE lot_id = %s", (lot,)) == 0


def test_balances_change_only_through_the_journal(app, su):
    a = new_tenant()
    lot = app.mint(a, 1_000_000)
    for stmt in ("UPDATE public.credit_lot_balances SET debited_micro = 0",
                 "UPDATE public.credit_lot_balances SET credit_micro = credit_micro",
                 "DELETE FROM public.credit_lot_balances",
                 "TRUNCATE public.credit_lot_balances",
                 "INSERT INTO public.credit_lot_balances (lot_id, community_id, amount_micro)"
                 " VALUES (gen_random_uuid(), gen_random_uuid(), 1)"):
        err = su.fails(stmt)
        assert err.pgcode == "P0002" and "maintained from lot_entries" in err.pgerror, (stmt, err.pgerror)
    assert balance(su, lot)[3] == 1_000_000


# --- Guarantee 6: no overflow -----------------------------------------------------------------------

def test_amounts_are_bounded_so_no_sum_overflows(app, su):
    a = new_tenant()
    for stmt, params in (
            ("INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (%s, 'seed', %s)", MAX + 1),
            ("INSERT INTO public.usage_events (community_id, amount_micro) VALUES (%s, %s)", MAX + 1),
            ("INSERT INTO public.usage_events (community_id, amount_micro) VALUES (%s, %s)", -1)):
        for runner in ("app", "su"):
            err = app.fails(stmt, (str(a), params), tenant=a) if runner == "app" else su.fails(stmt, (str(a), params))
            assert err.pgcode == "23514", (stmt, err.pgerror)
    lot = app.mint(a, MAX)
    err = app.fails(ENTRY, (lot, str(a), "debit", MAX + 1), tenant=a)
    assert err.pgcode == "23514" and "lot_entries_amount_micro_check" in err.pgerror
    err = app.fails("INSERT INTO public.reconciliation_cursor (community_id, drift_micro) VALUES (%s, %s)",
                    (str(a), MAX + 1))
    assert err.pgcode == "23514"
    # A tenant's lots at the maximum: the view and the tenant's totals compute (sum(bigint) is numeric).
    for _ in range(20):
        app.mint(a, MAX)
    app.run(ENTRY, (lot, str(a), "debit", MAX), tenant=a)
    app.run(ENTRY, (lot, str(a), "credit_back", MAX), tenant=a)
    total, credited = app.run("SELECT sum(remaining_micro), sum(credited_micro) FROM public.lot_balances", tenant=a)[0]
    assert total == 21 * MAX and credited == 22 * MAX
    assert app.run("SELECT max(credited_micro) FROM public.lot_balances", tenant=a) == [(2 * MAX,)]
    # The counters are bounded too (2^62): debits and credit_backs can cycle, never towards an overflow.
    assert su.one("SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                  " WHERE conname = 'credit_lot_balances_debited_micro_check'") == \
        "CHECK (((debited_micro >= 0) AND (debited_micro <= '4611686018427387904'::bigint)))"
