"""Guarantee 1 under concurrency: racing sessions (threads, each with its own connection, READ
COMMITTED) never overdraw a lot, with or without the application's lock, and the lock order
(lot row, then balance row) never deadlocks with the application's FOR UPDATE path.

The races are made deterministic with locks, not sleeps: a gate session holds the lot row
(FOR UPDATE) until every racer is seen waiting on a lock in pg_stat_activity, or a barrier
lets every racer read before any writes.
"""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from ledger_app import App, debit_in, new_tenant

ENTRY = "INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro) VALUES (%s, %s, %s, %s)"


def wait_until_waiting(su, pids, timeout=120):
    """Until every backend in pids waits on a lock (a loaded machine may be slow: no tight timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = su.one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
                   (list(pids),))
        if n == len(pids):
            return
        time.sleep(0.02)
    raise AssertionError(f"racers {pids} never all waited on a lock")


class Racer(threading.Thread):
    """One session running fn(app) once, recording its result or its SQLSTATE."""

    def __init__(self, url, fn, how="set_community_context"):
        super().__init__(daemon=True)
        self.app = App(url, how)
        self.pid = self.app.conn.get_backend_pid()
        self.fn = fn
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn(self.app)
        except psycopg2.Error as exc:
            self.error = exc
        finally:
            self.app.close()


def gated(su, url, lots, fns, how="set_community_context"):
    """Hold the lots (FOR UPDATE) until every racer waits on them, then let all go at once."""
    gate = psycopg2.connect(url)
    try:
        with gate.cursor() as cur:
            cur.execute("SELECT id FROM public.credit_lots WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE",
                        ([str(x) for x in lots],))
            racers = [Racer(url, fn, how) for fn in fns]
            for r in racers:
                r.start()
            wait_until_waiting(su, [r.pid for r in racers])
        gate.rollback()
    finally:
        gate.close()
    for r in racers:
        r.join(120)
        assert not r.is_alive(), "a racer is stuck"
    return racers


def check_consistent(su, lots):
    for lot in lots:
        amount, credited, debited, remaining = su.one(
            "SELECT original_micro, credited_micro, debited_micro, remaining_micro FROM public.lot_balances"
            " WHERE lot_id = %s", (lot,))
        journal = su.one("SELECT coalesce(sum(CASE WHEN entry_type IN ('credit', 'credit_back') THEN amount_micro"
                         " ELSE -amount_micro END), 0) FROM public.lot_entries WHERE lot_id = %s", (lot,))
        assert 0 <= remaining <= amount and remaining == journal == credited - debited, (lot, remaining, journal)


@pytest.mark.parametrize("how", ["set_community_context", "set_local"])
def test_racing_unlocked_debits_never_overdraw(ledger_db, su, how):
    a = new_tenant()
    owner = App(ledger_db)
    lot = owner.mint(a, 1_000_000)
    owner.close()

    def debit(app):  # a buggy caller: no FOR UPDATE, just the insert
        return app.run(ENTRY, (lot, str(a), "debit", 300_000), tenant=a)

    racers = gated(su, ledger_db, [lot], [debit] * 6, how)
    ok = [r for r in racers if r.error is None]
    refused = [r.error for r in racers if r.error is not None]
    assert len(ok) == 3, [str(e) for e in refused]
    assert all(e.pgcode == "23514" and "only 100000 remaining" in e.pgerror for e in refused), refused
    assert su.one("SELECT remaining_micro FROM public.lot_balances WHERE lot_id = %s", (lot,)) == 100_000
    check_consistent(su, [lot])


def test_read_then_write_race_cannot_spend_a_balance_twice(ledger_db, su):
    """Every racer reads the full balance before any writes (a barrier), then debits all of it."""
    a = new_tenant()
    owner = App(ledger_db)
    lot = owner.mint(a, 1_000_000)
    owner.close()
    barrier = threading.Barrier(4)

    def spend_all(app):
        with app.tx(a) as cur:
            cur.execute("SELECT remaining_micro FROM public.lot_balances WHERE lot_id = %s", (lot,))
            seen = cur.fetchone()[0]
            barrier.wait(120)
            cur.execute(ENTRY, (lot, str(a), "debit", seen))
            return seen

    racers = [Racer(ledger_db, spend_all) for _ in range(4)]
    for r in racers:
        r.start()
    for r in racers:
        r.join(120)
    assert [r.result for r in racers if r.error is None] == [1_000_000]
    assert sorted(r.error.pgcode for r in racers if r.error is not None) == ["23514"] * 3
    check_consistent(su, [lot])


def test_locked_and_unlocked_writers_mixed_never_deadlock(ledger_db, su):
    """The application's path (FOR UPDATE OF credit_lots, debit, deplete) racing buggy unlocked
    writers and expiry sweeps on the same two lots, several rounds: no 40P01, no overdraft."""
    a = new_tenant()
    owner = App(ledger_db)
    lots = [owner.mint(a, 1_000_000, expires_at="2990-01-01"), owner.mint(a, 1_000_000, expires_at="2999-01-01")]
    owner.close()
    errors = []
    for round_ in range(4):
        def locked(app, n=[0]):
            n[0] += 1
            with app.tx(a) as cur:
                return debit_in(cur, a, 150_000, f"r{round_}-{n[0]}-{threading.get_ident()}")

        def unlocked(app, lot):
            with app.tx(a) as cur:
                cur.execute(ENTRY, (lot, str(a), "debit", 100_000))
                cur.execute(ENTRY, (lot, str(a), "credit_back", 50_000))
                return 1

        fns = [locked, locked, locked, lambda app: unlocked(app, lots[0]), lambda app: unlocked(app, lots[1]),
               lambda app: unlocked(app, lots[0])]
        racers = gated(su, ledger_db, lots, fns)
        for r in racers:
            if r.error is not None:
                errors.append(r.error)
    assert not [e for e in errors if e.pgcode == "40P01"], [str(e) for e in errors]
    # The only refusals are a lot running dry (23514): never a deadlock, never an overdraft.
    assert all(e.pgcode == "23514" for e in errors), [str(e) for e in errors]
    assert su.one("SELECT count(*) FROM public.lot_entries WHERE lot_id = ANY(%s::uuid[]) AND entry_type = 'debit'",
                  ([str(x) for x in lots],)) >= 8  # the rounds really debited
    check_consistent(su, lots)


def test_lot_first_lock_order_is_what_avoids_the_deadlock(ledger_db, su):
    """Control: the design the SQL avoids (a BEFORE trigger that locks the balance row before the
    foreign key locks the lot) deadlocks against the application's FOR UPDATE; ours waits instead."""
    a = new_tenant()
    owner = App(ledger_db)
    lot = owner.mint(a, 1_000_000)
    owner.close()

    def scenario():
        holder = App(ledger_db)
        try:
            with holder.tx(a) as cur:
                cur.execute("SELECT id FROM public.credit_lots WHERE id = %s FOR UPDATE", (lot,))
                writer = Racer(ledger_db, lambda app: app.run(ENTRY, (lot, str(a), "debit", 1), tenant=a))
                writer.start()
                wait_until_waiting(su, [writer.pid])
                cur.execute(ENTRY, (lot, str(a), "debit", 1))
            writer.join(120)
            return None, writer.error
        except psycopg2.Error as exc:
            writer.join(120)
            return exc, writer.error
        finally:
            holder.close()

    assert scenario() == (None, None)  # ours: the writer waited for the lot, then debited
    su.run("CREATE FUNCTION public.bad_lock() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS"
           " $$ BEGIN PERFORM 1 FROM public.credit_lot_balances WHERE lot_id = NEW.lot_id FOR UPDATE;"
           " RETURN NEW; END $$;"
           " CREATE TRIGGER bad_lock BEFORE INSERT ON public.lot_entries FOR EACH ROW"
           " EXECUTE FUNCTION public.bad_lock()")
    errors = [e for e in scenario() if e is not None]
    assert [e.pgcode for e in errors] == ["40P01"], [str(e) for e in errors]
