"""The ledger migrations 0008-0011 on a real PostgreSQL 15: every guarantee of issue 3.

Each test gets a fresh copy of the migrated database (`ledger_db`) seeded with two
tenants' rows written the way the application writes them: connected as
`arrakis_app`, inside a transaction that called app.set_community_context().
The superuser session stands for the owner / a DBA (it bypasses RLS, not triggers).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import psycopg2
import pytest

# Tenant-scoped (RLS): every read or write of arrakis_app needs the transaction's tenant.
TENANT_TABLES = ["credit_lots", "lot_entries", "credit_lot_balances", "crypto_payments", "usage_events"]
# Tables the application inserts into with its tenant (the balances are the database's own).
APP_INSERTED = ["credit_lots", "lot_entries", "crypto_payments", "usage_events"]
APPEND_ONLY = ["credit_lots", "lot_entries", "usage_events", "webhook_events"]
SEARCH_PATH = ["search_path=pg_catalog, pg_temp"]
LEDGER_FUNCTIONS = {
    "app.current_community_id()",
    "app.set_community_context(uuid)",
    "app.update_lot_status(uuid,text)",
    "prevent_mutation()",
    "require_tenant_context()",
    "open_lot_balance()",
    "apply_lot_entry()",
    "enforce_payment_status_monotonicity()",
    "guard_jwks_key()",
    "guard_reconciliation_fence()",
}
SECURITY_DEFINER = {"app.update_lot_status(uuid,text)", "open_lot_balance()", "apply_lot_entry()"}


class Session:
    """One connection; every call runs in its own explicit transaction (as the app must)."""

    def __init__(self, url: str, user: str | None = None, role: str | None = None):
        if user:
            url = url.replace("://postgres@", f"://{user}@", 1)
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True
        self.role = role

    def _begin(self, cur, tenant):
        cur.execute("BEGIN")
        if self.role:
            cur.execute(f"SET LOCAL ROLE {self.role}")
        if tenant is not None:
            cur.execute("SELECT app.set_community_context(%s)", (str(tenant),))

    def run(self, sql: str, params=None, tenant=None):
        """Run one statement in a committed transaction; rows (or rowcount when none)."""
        with self.conn.cursor() as cur:
            self._begin(cur, tenant)
            try:
                cur.execute(sql, params)
                result = cur.fetchall() if cur.description else cur.rowcount
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return result

    def one(self, sql: str, params=None, tenant=None):
        rows = self.run(sql, params, tenant)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    def fails(self, sql: str, params=None, tenant=None) -> psycopg2.Error:
        """Run a statement that must fail; returns the error (pgcode, pgerror)."""
        with self.conn.cursor() as cur:
            self._begin(cur, tenant)
            try:
                cur.execute(sql, params)
            except psycopg2.Error as exc:
                cur.execute("ROLLBACK")
                return exc
            cur.execute("ROLLBACK")
        raise AssertionError(f"expected an error from: {sql}")

    def close(self):
        self.conn.close()


@dataclass
class Tenant:
    id: uuid.UUID
    lots: list = field(default_factory=list)
    payment_ids: list = field(default_factory=list)


@dataclass
class Ledger:
    url: str
    su: Session
    app: Session
    admin: Session
    a: Tenant
    b: Tenant


def seed_tenant(app: Session, t: Tenant, tag: str) -> None:
    """Two lots (one bought, one granted with expiry), their entries, a payment, usage, a cursor."""
    pay = f"pay-{tag}-{uuid.uuid4().hex[:8]}"
    lot1 = app.one(
        "INSERT INTO public.credit_lots (community_id, source, payment_id, amount_micro)"
        " VALUES (%s, 'purchase', %s, 10000000) RETURNING id", (str(t.id), pay), tenant=t.id)
    lot2 = app.one(
        "INSERT INTO public.credit_lots (community_id, source, amount_micro, expires_at)"
        " VALUES (%s, 'grant', 2000000, now() + interval '30 days') RETURNING id", (str(t.id),), tenant=t.id)
    t.lots += [lot1, lot2]
    t.payment_ids.append(pay)
    entries = [(lot1, "credit", 10000000, None), (lot1, "debit", 2500000, f"res-{tag}-1"),
               (lot1, "credit_back", 500000, None), (lot2, "credit", 2000000, None),
               (lot2, "expiry", 2000000, None)]
    for lot, kind, amount, res in entries:
        app.run("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id)"
                " VALUES (%s, %s, %s, %s, %s)", (lot, str(t.id), kind, amount, res), tenant=t.id)
    app.run("INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd) VALUES (%s, %s, 10.00)",
            (str(t.id), pay), tenant=t.id)
    app.run("INSERT INTO public.usage_events (community_id, tokens_input, tokens_output, amount_micro,"
            " finalization_id) VALUES (%s, 100, 50, 2500000, %s)", (str(t.id), f"fin-{tag}"), tenant=t.id)
    app.run("INSERT INTO public.reconciliation_cursor (community_id) VALUES (%s)", (str(t.id),), tenant=t.id)


@pytest.fixture
def ledger(ledger_db):
    su = Session(ledger_db)
    app = Session(ledger_db, user="arrakis_app")
    admin = Session(ledger_db, role="arrakis_admin")
    a, b = Tenant(uuid.uuid4()), Tenant(uuid.uuid4())
    seed_tenant(app, a, "a")
    seed_tenant(app, b, "b")
    try:
        yield Ledger(ledger_db, su, app, admin, a, b)
    finally:
        for s in (su, app, admin):
            s.close()


# --- 0008: the tenant context -------------------------------------------------------------

def test_current_community_id_raises_p0001_when_never_set(ledger):
    err = ledger.app.fails("SELECT app.current_community_id()")
    assert err.pgcode == "P0001"
    assert "app.community_id is not set" in err.pgerror


def test_current_community_id_treats_leftover_empty_setting_as_not_set(ledger):
    # A committed transaction's local setting leaves '' behind on the (pooled) connection.
    assert ledger.app.one("SELECT app.current_community_id()", tenant=ledger.a.id) == str(ledger.a.id)
    assert ledger.app.one("SELECT current_setting('app.community_id', true)") == ""
    err = ledger.app.fails("SELECT app.current_community_id()")
    assert err.pgcode == "P0001", err.pgerror  # not 22P02 (a cast error)
    assert "app.community_id is not set" in err.pgerror


def test_set_community_context_lasts_one_transaction_only(ledger):
    cur = ledger.app.conn.cursor()
    cur.execute("BEGIN")
    cur.execute("SELECT app.set_community_context(%s)", (str(ledger.a.id),))
    cur.execute("SELECT app.current_community_id()")
    assert cur.fetchone()[0] == str(ledger.a.id)
    cur.execute("COMMIT")
    # Outside a transaction block (autocommit), the setting dies with the statement.
    cur.execute("SELECT app.set_community_context(%s)", (str(ledger.a.id),))
    cur.execute("SELECT coalesce(current_setting('app.community_id', true), '')")
    assert cur.fetchone()[0] == ""
    err = ledger.app.fails("SELECT app.set_community_context(NULL)")
    assert err.pgcode == "22004"


# --- Guarantee 1: tenant isolation ----------------------------------------------------------

@pytest.mark.parametrize("relation", TENANT_TABLES + ["lot_balances"])
def test_app_reads_only_its_tenant_rows(ledger, relation):
    total = ledger.su.one(f"SELECT count(*) FROM public.{relation}")
    for me, other in ((ledger.a, ledger.b), (ledger.b, ledger.a)):
        rows = ledger.app.run(f"SELECT community_id FROM public.{relation}", tenant=me.id)
        assert rows, f"{relation}: tenant sees none of its own rows"
        assert {r[0] for r in rows} == {str(me.id)}
        assert 0 < len(rows) < total
    # Without a context: P0001 naming app.community_id, deliberately not the runbook's "0 rows"
    # (a sweep that forgot its context must fail, not find nothing to do).
    err = ledger.app.fails(f"SELECT * FROM public.{relation}")
    assert err.pgcode == "P0001" and "app.community_id is not set" in err.pgerror, err.pgerror


INSERTS = {
    "credit_lots": "INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (%(c)s, 'seed', 1000000)",
    "lot_entries": "INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
                   " VALUES (%(lot)s, %(c)s, 'credit_back', 1)",
    "crypto_payments": "INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd)"
                       " VALUES (%(c)s, 'p-' || gen_random_uuid(), 5)",
    "usage_events": "INSERT INTO public.usage_events (community_id, amount_micro) VALUES (%(c)s, 1)",
}


@pytest.mark.parametrize("table", APP_INSERTED)
def test_app_writes_only_its_tenant_rows(ledger, table):
    a, b = ledger.a, ledger.b
    # With tenant A's context, a row of tenant B is refused by the policy's WITH CHECK.
    err = ledger.app.fails(INSERTS[table], {"c": str(b.id), "lot": b.lots[0]}, tenant=a.id)
    assert err.pgcode == "42501", err.pgerror
    assert "row-level security" in err.pgerror
    # Without a context nothing can be inserted: the guard raises P0001.
    err = ledger.app.fails(INSERTS[table], {"c": str(a.id), "lot": a.lots[0]})
    assert err.pgcode == "P0001", err.pgerror
    assert "app.community_id is not set" in err.pgerror
    # Its own tenant: accepted.
    own = a.id if table == "lot_entries" else uuid.uuid4()
    assert ledger.app.run(INSERTS[table], {"c": str(own), "lot": a.lots[0]}, tenant=own) == 1


def test_rls_enabled_and_forced_on_every_tenant_table(ledger):
    rows = ledger.su.run(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r'"
        " AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'community_id')")
    assert {r[0] for r in rows} == set(TENANT_TABLES) | {"reconciliation_cursor"}
    # The reconciler's cursor is a service's table (no tenant context): no RLS, by design.
    assert all(r[1] and r[2] for r in rows if r[0] != "reconciliation_cursor"), rows
    assert [r[1:] for r in rows if r[0] == "reconciliation_cursor"] == [(False, False)]
    policies = ledger.su.run("SELECT tablename, policyname, roles::text[], cmd, qual, with_check FROM pg_policies"
                             " WHERE schemaname = 'public' ORDER BY tablename")
    assert {p[0] for p in policies} == set(TENANT_TABLES)
    for table, name, roles, cmd, qual, check in policies:
        assert name == f"{table}_tenant_isolation" and roles == ["public"] and cmd == "ALL"
        assert qual == "((app.current_community_id() IS NOT NULL) AND (community_id = app.current_community_id()))"
        assert check == "(community_id = app.current_community_id())"


def test_view_runs_with_the_callers_rights(ledger):
    opts = ledger.su.one("SELECT reloptions FROM pg_class WHERE oid = 'public.lot_balances'::regclass")
    assert "security_invoker=true" in opts
    a = ledger.a
    rows = ledger.app.run("SELECT lot_id, community_id, source, original_micro, credited_micro, debited_micro,"
                          " remaining_micro FROM public.lot_balances ORDER BY original_micro DESC", tenant=a.id)
    assert [(r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        (str(a.id), "purchase", 10000000, 10500000, 2500000, 8000000),  # credit + credit_back - debit
        (str(a.id), "grant", 2000000, 2000000, 2000000, 0),             # credit - expiry
    ]
    # Control: the same view without security_invoker, owned by the migration user,
    # hands tenant B's rows to tenant A. The test above would catch that.
    ledger.su.run("DO $$ BEGIN EXECUTE 'CREATE VIEW public.leaky AS '"
                  " || pg_get_viewdef('public.lot_balances'::regclass); END $$;"
                  " GRANT SELECT ON public.leaky TO arrakis_app")
    leaked = ledger.app.run("SELECT DISTINCT community_id FROM public.leaky", tenant=a.id)
    assert {r[0] for r in leaked} == {str(a.id), str(ledger.b.id)}


# --- Guarantee 2: an entry and its lot share the tenant --------------------------------------

def test_entry_cannot_reference_another_tenants_lot(ledger):
    a, b = ledger.a, ledger.b
    sql = ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
           " VALUES (%s, %s, 'debit', 1)")
    # Tenant B, in its own context, pointing at A's lot.
    err = ledger.app.fails(sql, (a.lots[0], str(b.id)), tenant=b.id)
    assert err.pgcode == "23503", err.pgerror
    # Even a superuser (RLS bypassed) cannot write a cross-tenant entry: the database refuses it.
    err = ledger.su.fails(sql, (a.lots[0], str(b.id)))
    assert err.pgcode == "23503"
    assert "lot_entries_lot_id_community_id_fkey" in err.pgerror
    fk = ledger.su.one(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'lot_entries_lot_id_community_id_fkey'")
    assert fk == "FOREIGN KEY (lot_id, community_id) REFERENCES credit_lots(id, community_id)"


# --- Guarantee 3: append-only -----------------------------------------------------------------

MUTATIONS = {
    "UPDATE": "UPDATE public.{t} SET {col} = {col}",
    "DELETE": "DELETE FROM public.{t}",
    "TRUNCATE": "TRUNCATE public.{t} CASCADE",
}
SOME_COLUMN = {"credit_lots": "amount_micro", "lot_entries": "amount_micro", "usage_events": "amount_micro",
               "webhook_events": "payload"}


@pytest.mark.parametrize("op", sorted(MUTATIONS))
@pytest.mark.parametrize("table", APPEND_ONLY)
def test_append_only_even_for_the_superuser(ledger, table, op):
    ledger.su.run("INSERT INTO public.webhook_events (provider, event_id) VALUES ('x402', 'evt-1')")
    before = ledger.su.one(f"SELECT count(*) FROM public.{table}")
    assert before > 0
    err = ledger.su.fails(MUTATIONS[op].format(t=table, col=SOME_COLUMN[table]))
    assert err.pgcode == "P0002", err.pgerror
    assert "append-only" in err.pgerror and op in err.pgerror
    assert ledger.su.one(f"SELECT count(*) FROM public.{table}") == before


@pytest.mark.parametrize("table", APPEND_ONLY + ["credit_lot_balances"])
def test_app_holds_no_update_delete_truncate_grant(ledger, table):
    for priv in ("UPDATE", "DELETE", "TRUNCATE"):
        assert ledger.su.one("SELECT has_table_privilege('arrakis_app', %s, %s)", (f"public.{table}", priv)) is False
    # Row locks (FOR UPDATE OF credit_lots) need UPDATE on a column: status only, guarded by the trigger.
    updatable = ledger.su.run("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                              " AND NOT attisdropped AND has_column_privilege('arrakis_app', attrelid, attnum,"
                              " 'UPDATE') ORDER BY attname", (f"public.{table}",))
    assert [r[0] for r in updatable] == (["status"] if table == "credit_lots" else [])
    if table == "credit_lot_balances":
        assert not ledger.su.one("SELECT has_table_privilege('arrakis_app', 'public.credit_lot_balances', 'INSERT')")
        return
    for priv in ("SELECT", "INSERT"):
        assert ledger.su.one("SELECT has_table_privilege('arrakis_app', %s, %s)", (f"public.{table}", priv))
    err = ledger.app.fails(MUTATIONS["DELETE"].format(t=table), tenant=ledger.a.id)
    assert err.pgcode == "42501"


# --- Guarantee 4: the one permitted change of a lot --------------------------------------------

def lot_status(ledger, lot):
    return ledger.su.one("SELECT status FROM public.credit_lots WHERE id = %s", (lot,))


def test_update_lot_status_allows_only_active_to_expired_or_depleted(ledger):
    a, b = ledger.a, ledger.b
    ledger.app.run("SELECT app.update_lot_status(%s, 'expired')", (a.lots[1],), tenant=a.id)
    assert lot_status(ledger, a.lots[1]) == "expired"
    ledger.app.run("SELECT app.update_lot_status(%s, 'depleted')", (a.lots[0],), tenant=a.id)
    assert lot_status(ledger, a.lots[0]) == "depleted"
    # Marking a final lot again (the same or the other final status) is a no-op: it stays as it is.
    for again in ("expired", "depleted"):
        ledger.app.run("SELECT app.update_lot_status(%s, %s)", (a.lots[1], again), tenant=a.id)
        assert lot_status(ledger, a.lots[1]) == "expired"
    # ... but no path leads out of a final status, even for the owner with the function's flag.
    err = ledger.su.fails("SELECT set_config('app.lot_status_transition', %s, true);"
                          " UPDATE public.credit_lots SET status = 'depleted' WHERE id = %s", (a.lots[1], a.lots[1]))
    assert err.pgcode == "P0002" and "append-only" in err.pgerror
    # Back to active (or any other target): refused by the function.
    err = ledger.app.fails("SELECT app.update_lot_status(%s, 'active')", (a.lots[1],), tenant=a.id)
    assert err.pgcode == "22023"
    # Another tenant's lot is not found in this tenant's context, and stays as it was.
    err = ledger.app.fails("SELECT app.update_lot_status(%s, 'expired')", (b.lots[0],), tenant=a.id)
    assert err.pgcode == "P0002" and "not found" in err.pgerror
    assert lot_status(ledger, b.lots[0]) == "active"
    # No context: the guard.
    err = ledger.app.fails("SELECT app.update_lot_status(%s, 'expired')", (b.lots[0],))
    assert err.pgcode == "P0001"


def test_any_other_change_of_a_lot_is_refused(ledger):
    lot = ledger.b.lots[0]
    # A direct status UPDATE, even by the superuser, does not go through the function: refused.
    err = ledger.su.fails("UPDATE public.credit_lots SET status = 'expired' WHERE id = %s", (lot,))
    assert err.pgcode == "P0002"
    # Whoever sets the function's flag by hand still cannot change anything but the status.
    err = ledger.su.fails(
        "SELECT set_config('app.lot_status_transition', %s, true);"
        " UPDATE public.credit_lots SET status = 'expired', amount_micro = 1 WHERE id = %s", (lot, lot))
    assert err.pgcode == "P0002"
    assert "and other columns changed" in err.pgerror
    assert lot_status(ledger, lot) == "active"
    # arrakis_app holds UPDATE (status) for row locks only: a direct UPDATE is refused by the trigger,
    # any other column by the privileges.
    err = ledger.app.fails("UPDATE public.credit_lots SET status = 'expired' WHERE id = %s", (lot,),
                           tenant=ledger.b.id)
    assert err.pgcode == "P0002", err.pgerror
    err = ledger.app.fails("UPDATE public.credit_lots SET amount_micro = 1 WHERE id = %s", (lot,), tenant=ledger.b.id)
    assert err.pgcode == "42501"
    assert lot_status(ledger, lot) == "active"


def test_status_transition_does_not_block_other_sessions_inserts(ledger):
    a, b = ledger.a, ledger.b
    holder = Session(ledger.url, user="arrakis_app")
    writer = Session(ledger.url, user="arrakis_app")
    try:
        hcur = holder.conn.cursor()
        hcur.execute("BEGIN")
        hcur.execute("SELECT app.set_community_context(%s)", (str(a.id),))
        hcur.execute("SELECT app.update_lot_status(%s, 'expired')", (a.lots[1],))
        # The open transaction holds nothing stronger than what an INSERT takes.
        locks = ledger.su.run(
            "SELECT mode FROM pg_locks WHERE pid = %s AND relation = 'public.credit_lots'::regclass",
            (holder.conn.get_backend_pid(),))
        assert {m for (m,) in locks} == {"RowExclusiveLock"}
        with writer.conn.cursor() as wcur:
            wcur.execute("SET lock_timeout = '300ms'")
        for tenant in (a, b):
            writer.run("INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (%s, 'seed', 7)",
                       (str(tenant.id),), tenant=tenant.id)
        # An entry on the very lot being updated (the foreign key's KEY SHARE lock) does not wait either.
        writer.run("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
                   " VALUES (%s, %s, 'credit_back', 1)", (a.lots[1], str(a.id)), tenant=a.id)
        hcur.execute("COMMIT")
        assert lot_status(ledger, a.lots[1]) == "expired"
        assert ledger.su.one("SELECT count(*) FROM public.credit_lots WHERE amount_micro = 7") == 2

        # Control: the design the issue rules out (disabling the trigger at run time) blocks
        # the same insert, so the lock_timeout above really detects a block.
        ledger.su.conn.cursor().execute(
            "BEGIN; ALTER TABLE public.credit_lots DISABLE TRIGGER credit_lots_no_update")
        err = writer.fails("INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                           " VALUES (%s, 'seed', 8)", (str(b.id),), tenant=b.id)
        assert err.pgcode == "55P03", err.pgerror
        ledger.su.conn.cursor().execute("ROLLBACK")
    finally:
        holder.close()
        writer.close()


# --- Guarantee 5: SECURITY DEFINER hygiene ------------------------------------------------------

def test_functions_pin_search_path_and_are_not_public(ledger):
    rows = ledger.su.run(
        "SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig, p.proacl::text[],"
        " has_function_privilege('arrakis_app', p.oid, 'EXECUTE'),"
        " has_function_privilege('arrakis_admin', p.oid, 'EXECUTE')"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname IN ('app', 'public')")
    funcs = {r[0]: r[1:] for r in rows}
    assert set(funcs) == LEDGER_FUNCTIONS
    assert {name for name, f in funcs.items() if f[0]} == SECURITY_DEFINER
    for name, (_secdef, config, acl, app_exec, admin_exec) in funcs.items():
        assert config == SEARCH_PATH, name
        assert acl is not None and not any(item.startswith("=") for item in acl), (name, acl)  # no PUBLIC
        assert admin_exec is False, name
        assert app_exec is (name.startswith("app.")), name


def test_security_definer_function_ignores_a_callers_temp_table(ledger):
    a = ledger.a
    cur = ledger.app.conn.cursor()
    cur.execute("BEGIN")
    cur.execute("SELECT app.set_community_context(%s)", (str(a.id),))
    cur.execute("CREATE TEMP TABLE credit_lots (id uuid, community_id uuid, status text) ON COMMIT DROP")
    cur.execute("INSERT INTO credit_lots VALUES (%s, %s, 'active')", (a.lots[1], str(a.id)))
    cur.execute("SET LOCAL search_path = pg_temp, public")
    cur.execute("SELECT app.update_lot_status(%s, 'expired')", (a.lots[1],))
    cur.execute("SELECT status FROM pg_temp.credit_lots")
    assert cur.fetchone()[0] == "active"
    cur.execute("COMMIT")
    assert lot_status(ledger, a.lots[1]) == "expired"


# --- Guarantee 6: webhook dedup ---------------------------------------------------------------

def test_webhook_dedup_for_the_app(ledger):
    sql = ("INSERT INTO public.webhook_events (provider, event_id, payload) VALUES ('nowpayments', 'np-42', %s)"
           " ON CONFLICT (provider, event_id) DO NOTHING")
    assert ledger.app.run(sql, ('{"payment_status": "finished"}',)) == 1
    assert ledger.app.run(sql, ('{"payment_status": "finished"}',)) == 0
    assert ledger.app.run("SELECT count(*), min(payload->>'payment_status') FROM public.webhook_events") == \
        [(1, "finished")]
    # The same event id from another provider is another event.
    assert ledger.app.run(sql.replace("'nowpayments'", "'x402'"), ("{}",)) == 1
    for stmt in ("UPDATE public.webhook_events SET payload = '{}'", "DELETE FROM public.webhook_events"):
        assert ledger.app.fails(stmt).pgcode == "42501"
        assert ledger.su.fails(stmt).pgcode == "P0002"


# --- Guarantee 7: JWKS keys and the reconciliation cursor -------------------------------------

ACTIVE_KEYS = ("SELECT kid FROM public.s2s_jwks_public_keys WHERE issuer = %s AND revoked_at IS NULL"
               " AND (expires_at IS NULL OR expires_at > now()) ORDER BY kid")


def test_app_inserts_and_reads_jwks_keys(ledger):
    ins = "INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer, expires_at) VALUES (%s, 'xx', 'yy', %s, %s)"
    ledger.app.run(ins, ("k1", "finn", None))
    ledger.app.run(ins, ("k2", "finn", "2000-01-01"))     # expired
    ledger.app.run(ins, ("k3", "freeside", None))
    ledger.app.run("UPDATE public.s2s_jwks_public_keys SET revoked_at = now() WHERE kid = 'k3'")
    assert ledger.app.run(ACTIVE_KEYS, ("finn",)) == [("k1",)]
    assert ledger.app.run(ACTIVE_KEYS, ("freeside",)) == []
    assert ledger.app.one("SELECT kty || ' ' || crv FROM public.s2s_jwks_public_keys WHERE kid = 'k1'") == "EC P-256"
    err = ledger.app.fails("INSERT INTO public.s2s_jwks_public_keys (kid, kty, x, y, issuer)"
                           " VALUES ('k4', 'RSA', 'x', 'y', 'finn')")
    assert err.pgcode == "23514"
    # The app may revoke (flow 7); nothing else of a key changes (guarantee 5: test_ledger_flows.py).
    assert ledger.app.fails("UPDATE public.s2s_jwks_public_keys SET x = 'evil'").pgcode == "42501"


def test_app_creates_and_advances_its_cursor(ledger):
    a, b = ledger.a, ledger.b
    fresh = uuid.uuid4()
    upsert = ("INSERT INTO public.reconciliation_cursor (community_id, last_fence_token, drift_micro)"
              " VALUES (%s, %s, %s) ON CONFLICT (community_id) DO UPDATE"
              " SET last_fence_token = EXCLUDED.last_fence_token, drift_micro = EXCLUDED.drift_micro,"
              " updated_at = now() WHERE reconciliation_cursor.last_fence_token < EXCLUDED.last_fence_token")
    # The reconciler is a service, not a tenant: no context.
    assert ledger.app.run(upsert, (str(fresh), 1, 0)) == 1         # created
    assert ledger.app.run(upsert, (str(fresh), 5, -3)) == 1        # advanced
    assert ledger.app.run(upsert, (str(fresh), 4, 0)) == 0         # stale fence: no-op
    advance = ("UPDATE public.reconciliation_cursor SET last_fence_token = %s, last_processed_event_id = %s,"
               " last_reconciled_at = now(), updated_at = now() WHERE community_id = %s AND last_fence_token < %s")
    ev = str(uuid.uuid4())
    assert ledger.app.run(advance, (9, ev, str(a.id), 9)) == 1
    assert ledger.app.run("SELECT last_fence_token, last_processed_event_id::text FROM public.reconciliation_cursor"
                          " WHERE community_id = %s", (str(a.id),)) == [(9, ev)]
    assert ledger.app.one("SELECT drift_micro FROM public.reconciliation_cursor WHERE community_id = %s",
                          (str(fresh),)) == -3
    # A stale compare-and-set changes nothing; B's cursor is untouched; no cursor moves community or goes away.
    assert ledger.app.run(advance, (9, ev, str(a.id), 9)) == 0
    assert ledger.su.one("SELECT last_fence_token FROM public.reconciliation_cursor WHERE community_id = %s",
                         (str(b.id),)) == 0
    err = ledger.app.fails("UPDATE public.reconciliation_cursor SET community_id = %s", (str(b.id),))
    assert err.pgcode == "42501"
    assert ledger.app.fails("DELETE FROM public.reconciliation_cursor").pgcode == "42501"


# --- Guarantee 8: money ---------------------------------------------------------------------------

def test_money_is_bigint_micro_usd(ledger):
    rows = ledger.su.run("SELECT table_name, column_name, data_type FROM information_schema.columns"
                         " WHERE table_schema = 'public' AND column_name LIKE '%%\\_micro'")
    assert len(rows) == 13, rows  # 3 tables' amounts, the cursor's drift, the balances' 5, the view's 4
    assert {r[2] for r in rows} == {"bigint"}, rows
    a = ledger.a
    for amount in (0, -1, 10**15 + 1):
        err = ledger.app.fails("INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                               " VALUES (%s, 'seed', %s)", (str(a.id), amount), tenant=a.id)
        assert err.pgcode == "23514"


def test_duplicate_payment_id_cannot_mint_a_second_lot(ledger):
    a, b = ledger.a, ledger.b
    sql = ("INSERT INTO public.credit_lots (community_id, source, payment_id, amount_micro)"
           " VALUES (%s, 'purchase', %s, 10000000)")
    for tenant in (a, b):  # a replay in the same tenant, or the payment claimed by another tenant
        err = ledger.app.fails(sql, (str(tenant.id), a.payment_ids[0]), tenant=tenant.id)
        assert err.pgcode == "23505" and "credit_lots_payment_id_key" in err.pgerror
    assert ledger.su.one("SELECT count(*) FROM public.credit_lots WHERE payment_id = %s", (a.payment_ids[0],)) == 1
    # Lots without a payment (grants, seeds) are not limited.
    ledger.app.run(sql.replace("%s, 10000000", "NULL, 1"), (str(a.id),), tenant=a.id)
    ledger.app.run(sql.replace("%s, 10000000", "NULL, 1"), (str(a.id),), tenant=a.id)


def test_one_debit_per_lot_and_reservation(ledger):
    a = ledger.a
    sql = ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id)"
           " VALUES (%s, %s, %s, 1, %s)")
    err = ledger.app.fails(sql, (a.lots[0], str(a.id), "debit", "res-a-1"), tenant=a.id)  # seeded already
    assert err.pgcode == "23505" and "lot_entries_one_debit_per_reservation" in err.pgerror
    ledger.app.run(sql, (a.lots[0], str(a.id), "credit_back", "res-a-1"), tenant=a.id)
    # The same reservation on another lot is another debit.
    lot3 = ledger.app.one("INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (%s, 'grant', 5)"
                          " RETURNING id", (str(a.id),), tenant=a.id)
    ledger.app.run(sql, (lot3, str(a.id), "credit", None), tenant=a.id)
    ledger.app.run(sql, (lot3, str(a.id), "debit", "res-a-1"), tenant=a.id)


# --- crypto_payments: status monotonicity ---------------------------------------------------------

def test_payment_status_only_moves_forward(ledger):
    a = ledger.a
    pay = a.payment_ids[0]
    row = "SELECT status, status_rank, updated_at, created_at FROM public.crypto_payments WHERE payment_id = %s"
    status, rank, updated, created = ledger.app.run(row, (pay,), tenant=a.id)[0]
    assert (status, rank) == ("waiting", 0) and updated == created
    upd = "UPDATE public.crypto_payments SET status = %s WHERE payment_id = %s"
    for new, new_rank in (("confirming", 1), ("finished", 5)):
        assert ledger.app.run(upd, (new, pay), tenant=a.id) == 1
        status, rank, updated2, _ = ledger.app.run(row, (pay,), tenant=a.id)[0]
        assert (status, rank) == (new, new_rank) and updated2 > updated
        updated = updated2
    err = ledger.app.fails(upd, ("confirmed", pay), tenant=a.id)
    assert err.pgcode == "23514" and "cannot move from finished" in err.pgerror
    # Other fields may change while the status stays; the app cannot touch rank, amount or tenant.
    assert ledger.app.run("UPDATE public.crypto_payments SET metadata = '{\"n\": 1}' WHERE payment_id = %s",
                          (pay,), tenant=a.id) == 1
    for col, val in (("status_rank", 0), ("amount_usd", 1), ("community_id", str(ledger.b.id))):
        err = ledger.app.fails(f"UPDATE public.crypto_payments SET {col} = %s WHERE payment_id = %s", (val, pay),
                               tenant=a.id)
        assert err.pgcode == "42501", col
    # The owner cannot rewrite a payment's identity; a forged rank is overwritten by the trigger.
    assert ledger.su.fails("UPDATE public.crypto_payments SET amount_usd = 1 WHERE payment_id = %s",
                           (pay,)).pgcode == "P0002"
    ledger.su.run("UPDATE public.crypto_payments SET status_rank = 0 WHERE payment_id = %s", (pay,))
    assert ledger.su.one("SELECT status_rank FROM public.crypto_payments WHERE payment_id = %s", (pay,)) == 5
    err = ledger.app.fails("INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd, status)"
                           " VALUES (%s, 'p-x', 1, 'lost')", (str(a.id),), tenant=a.id)
    assert err.pgcode == "23514"


def test_payment_mints_once_into_a_lot_of_its_tenant(ledger):
    a, b = ledger.a, ledger.b
    pay = a.payment_ids[0]
    mint = ("UPDATE public.crypto_payments SET credits_minted_at = now(), credits_mint_lot_id = %s"
            " WHERE payment_id = %s")
    err = ledger.app.fails(mint, (b.lots[0], pay), tenant=a.id)
    assert err.pgcode == "23503", err.pgerror  # B's lot for A's payment
    assert ledger.app.run(mint, (a.lots[0], pay), tenant=a.id) == 1
    err = ledger.app.fails(mint, (a.lots[1], pay), tenant=a.id)
    assert err.pgcode == "P0002" and "already minted" in err.pgerror
    err = ledger.app.fails("UPDATE public.crypto_payments SET credits_minted_at = now() WHERE payment_id = %s",
                           (b.payment_ids[0],), tenant=b.id)
    assert err.pgcode == "23514"  # minted_at without the lot


# --- Guarantee 9: the application's queries are indexed --------------------------------------------

POPULATE = """
INSERT INTO public.credit_lots (community_id, source, payment_id, amount_micro, status, expires_at, created_at)
SELECT ('00000000-0000-0000-0000-' || lpad((g % 200)::text, 12, '0'))::uuid,
       CASE WHEN g % 3 = 0 THEN 'purchase' ELSE 'grant' END,
       CASE WHEN g % 3 = 0 THEN 'pop-' || g END,
       1000000 + g,
       CASE WHEN g % 10 = 0 THEN 'active' WHEN g % 10 < 5 THEN 'depleted' ELSE 'expired' END,
       CASE WHEN g % 20 = 0 THEN now() + (g % 50 - 25) * interval '1 day' END,
       now() - g * interval '1 minute'
  FROM generate_series(1, 20000) AS g;
INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id, created_at)
SELECT l.id, l.community_id, e.kind, e.amount, CASE WHEN e.kind = 'debit' THEN 'r-' || l.id END, l.created_at
  FROM public.credit_lots l
 CROSS JOIN (VALUES (1, 'credit', 2000), (2, 'debit', 1000), (3, 'expiry', 1000)) AS e (n, kind, amount)
 ORDER BY l.id, e.n;
INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd, status, created_at)
SELECT ('00000000-0000-0000-0000-' || lpad((g % 200)::text, 12, '0'))::uuid, 'cp-' || g, 10,
       CASE WHEN g % 50 = 0 THEN 'waiting' WHEN g % 50 = 1 THEN 'confirming' ELSE 'finished' END,
       now() - g * interval '1 minute'
  FROM generate_series(1, 20000) AS g;
INSERT INTO public.usage_events (community_id, amount_micro, finalization_id, created_at)
SELECT ('00000000-0000-0000-0000-' || lpad((g % 200)::text, 12, '0'))::uuid, g, 'f-' || g,
       now() - g * interval '1 minute'
  FROM generate_series(1, 40000) AS g;
INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer, created_at, expires_at, revoked_at)
SELECT 'kid-' || g, 'x', 'y', CASE WHEN g % 2 = 0 THEN 'finn' ELSE 'freeside' END,
       now() - g * interval '1 hour', now() + interval '30 days', CASE WHEN g > 10 THEN now() END
  FROM generate_series(1, 5000) AS g;
ANALYZE;
"""
TENANT = "00000000-0000-0000-0000-000000000007"


def plan_nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.fixture(scope="module")
def populated(pg_cluster, ledger_template):
    """One populated copy of the migrated database, shared by the plan tests (read-only)."""
    name = pg_cluster.create_db(template=ledger_template)
    url = pg_cluster.url(name)
    su = Session(url)
    su.run(POPULATE)
    lot = su.one("SELECT id FROM public.credit_lots WHERE community_id = %s LIMIT 1", (TENANT,))
    app, admin = Session(url, user="arrakis_app"), Session(url, role="arrakis_admin")
    try:
        yield su, app, admin, lot
    finally:
        for s in (su, app, admin):
            s.close()
        pg_cluster.drop_db(name)


QUERIES = [
    # (name, who, sql, relation -> acceptable indexes)
    ("one lot's balance", "app", "SELECT * FROM public.lot_balances WHERE lot_id = %(lot)s",
     {"credit_lots": {"credit_lots_pkey", "credit_lots_id_community_id_key"},
      "credit_lot_balances": {"credit_lot_balances_pkey"}}),
    ("a tenant's lots by time", "app",
     "SELECT id, amount_micro, status FROM public.credit_lots WHERE community_id = %(tenant)s"
     " ORDER BY created_at DESC LIMIT 50",
     {"credit_lots": {"credit_lots_community_id_created_at_idx"}}),
    # The app may leave the tenant filter to RLS: the policy's expression is an index condition.
    ("a tenant's lots by time, filtered by RLS alone", "app",
     "SELECT id, amount_micro, status FROM public.credit_lots ORDER BY created_at DESC LIMIT 50",
     {"credit_lots": {"credit_lots_community_id_created_at_idx"}}),
    ("the expiry sweep", "admin",
     "SELECT id, community_id FROM public.credit_lots WHERE status = 'active' AND expires_at <= now()"
     " ORDER BY expires_at LIMIT 500",
     {"credit_lots": {"credit_lots_expiry_sweep_idx"}}),
    ("stuck payments", "admin",
     "SELECT id, community_id, payment_id FROM public.crypto_payments"
     " WHERE status IN ('waiting', 'confirming', 'confirmed', 'sending')"
     " AND updated_at < now() - interval '1 hour' ORDER BY updated_at LIMIT 100",
     {"crypto_payments": {"crypto_payments_status_updated_at_idx"}}),
    ("usage by tenant and time", "app",
     "SELECT event_id, amount_micro FROM public.usage_events WHERE community_id = %(tenant)s"
     " AND created_at >= now() - interval '2 days' ORDER BY created_at",
     {"usage_events": {"usage_events_community_id_created_at_idx"}}),
    ("active JWKS keys of an issuer", "app", ACTIVE_KEYS.replace("%s", "'finn'"),
     {"s2s_jwks_public_keys": {"s2s_jwks_public_keys_active_idx"}}),
]


@pytest.mark.parametrize("name,who,sql,expected", QUERIES, ids=[q[0] for q in QUERIES])
def test_application_queries_use_their_index(populated, name, who, sql, expected):
    su, app, admin, lot = populated
    session = app if who == "app" else admin
    tenant = TENANT if who == "app" else None
    (plan,), = session.run("EXPLAIN (FORMAT JSON) " + sql, {"lot": lot, "tenant": TENANT}, tenant=tenant)
    plan = plan if isinstance(plan, list) else json.loads(plan)
    nodes = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in plan_nodes(plan[0]["Plan"])]
    index_types = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
    for rel, indexes in expected.items():
        assert any(t in index_types and i in indexes for t, _r, i in nodes), \
            f"{name}: expected an index scan of {rel} on one of {sorted(indexes)}, plan: {nodes}"
        assert not any(t == "Seq Scan" and r == rel for t, r, _i in nodes), f"{name}: seq scan of {rel}: {nodes}"
    # The query returns rows (the plan is about a realistic, non-empty answer).
    assert session.run(sql, {"lot": lot, "tenant": TENANT}, tenant=tenant), name
