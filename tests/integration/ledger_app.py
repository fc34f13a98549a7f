"""The application's side of the ledger contract, as its services run it (issue 12).

`App` is one connection of `arrakis_app`; every unit of work is one transaction that sets
its tenant transaction-locally, either with `SELECT app.set_community_context($1)` or with
a literal `SET LOCAL app.community_id = '<uuid>'` (both are the application's). The flows
below are the application's statements, written once here for the flow, race and
pooler tests.
"""

from __future__ import annotations

import contextlib
import uuid

import psycopg2
from psycopg2 import sql

HOW = ("set_community_context", "set_local")

# Flow 2: the tenant's active lots with a balance, earliest expiry first, locked in that
# (deterministic) order. The balance read in the same statement may be stale once the lock
# was waited for, so the amounts come from a second statement, under the lock.
LOCK_LOTS = ("SELECT l.id FROM public.lot_balances AS b JOIN public.credit_lots AS l ON l.id = b.lot_id"
             " WHERE b.community_id = %s AND b.status = 'active' AND b.remaining_micro > 0"
             " ORDER BY l.expires_at NULLS LAST, l.created_at, l.id FOR UPDATE OF l")
REMAINING = ("SELECT lot_id, remaining_micro FROM public.lot_balances WHERE lot_id = ANY(%s::uuid[])"
             " AND remaining_micro > 0 ORDER BY expires_at NULLS LAST, created_at, lot_id")
DEBIT = ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id)"
         " VALUES (%s, %s, 'debit', %s, %s)"
         " ON CONFLICT (lot_id, reservation_id) WHERE entry_type = 'debit' DO NOTHING")
MINT = ("INSERT INTO public.credit_lots (community_id, source, amount_micro, payment_id, expires_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (payment_id) DO NOTHING RETURNING id")
CREDIT = ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
          " VALUES (%s, %s, 'credit', %s)")


def as_user(url: str, user: str) -> str:
    return url.replace("://postgres@", f"://{user}@", 1)


class App:
    """One connection of the application role."""

    def __init__(self, url: str, how: str = HOW[0], user: str = "arrakis_app"):
        self.conn = psycopg2.connect(as_user(url, user))
        self.how = how

    def set_context(self, cur, tenant) -> None:
        if self.how == "set_community_context":
            cur.execute("SELECT app.set_community_context(%s)", (str(tenant),))
        else:
            cur.execute(sql.SQL("SET LOCAL app.community_id = {}").format(sql.Literal(str(tenant))))

    @contextlib.contextmanager
    def tx(self, tenant=None):
        """One transaction (psycopg2 opens it with the first statement); commit, or roll back on error."""
        cur = self.conn.cursor()
        try:
            if tenant is not None:
                self.set_context(cur, tenant)
            yield cur
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    def run(self, query, params=None, tenant=None):
        with self.tx(tenant) as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else cur.rowcount

    def fails(self, query, params=None, tenant=None) -> psycopg2.Error:
        try:
            self.run(query, params, tenant)
        except psycopg2.Error as exc:
            return exc
        raise AssertionError(f"expected an error from: {query}")

    def close(self) -> None:
        self.conn.close()

    # ---- flows
    def mint(self, tenant, amount, payment_id=None, source="purchase", expires_at=None):
        """Flow 1: the lot (once per payment_id) and its credit entry; None when already minted."""
        with self.tx(tenant) as cur:
            cur.execute(MINT, (str(tenant), source, amount, payment_id, expires_at))
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(CREDIT, (row[0], str(tenant), amount))
            return row[0]

    def debit(self, tenant, amount, reservation, lock=True):
        """Flow 2: debit up to `amount` over the tenant's lots; marks used-up lots depleted. Debited total."""
        with self.tx(tenant) as cur:
            return debit_in(cur, tenant, amount, reservation, lock)

    def expire(self, tenant, lot):
        """Flow 3: an expiry entry of the remaining balance, then the status."""
        with self.tx(tenant) as cur:
            cur.execute("SELECT id FROM public.credit_lots WHERE id = %s FOR UPDATE", (lot,))
            cur.execute("SELECT remaining_micro FROM public.lot_balances WHERE lot_id = %s", (lot,))
            remaining = cur.fetchone()[0]
            if remaining:
                cur.execute("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
                            " VALUES (%s, %s, 'expiry', %s)", (lot, str(tenant), remaining))
            cur.execute("SELECT app.update_lot_status(%s, 'expired')", (lot,))
            return remaining


def debit_in(cur, tenant, amount, reservation, lock=True):
    """The debit flow inside an open transaction with the tenant's context."""
    if lock:
        cur.execute(LOCK_LOTS, (str(tenant),))
        lots = [r[0] for r in cur.fetchall()]
        cur.execute(REMAINING, (lots,))
    else:  # a buggy caller: no lock, trusts what it read
        cur.execute("SELECT lot_id, remaining_micro FROM public.lot_balances WHERE community_id = %s"
                    " AND status = 'active' AND remaining_micro > 0 ORDER BY expires_at NULLS LAST, created_at, lot_id",
                    (str(tenant),))
    left = amount
    for lot, remaining in cur.fetchall():
        take = min(left, remaining)
        cur.execute(DEBIT, (lot, str(tenant), take, reservation))
        if take == remaining:
            cur.execute("SELECT app.update_lot_status(%s, 'depleted')", (lot,))
        left -= take
        if not left:
            break
    return amount - left


def new_tenant() -> uuid.UUID:
    return uuid.uuid4()
