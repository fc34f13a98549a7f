# -*- coding: utf-8 -*-
"""ledger_verify's behaviour checks: two tenants' real rows as the application role, in a transaction rolled back."""

from __future__ import annotations

import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    format_pg_error,
)

try:
    import psycopg2
    import psycopg2.sql as pgsql
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
    pgsql = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_money import MoneyGuarantees
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_payments import PaymentAndUsageBehaviours
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    BLOCKING_LOCKS,
    CheckFailed,
    attempt,
    err_text,
    short,
    webhook_event_ids,
)


# --------------------------------------------------------------------------- behaviour

# The behaviours a .verify.json file may name ("behaviours"), each a method of Behaviour. tenant_context
# also runs through PgBouncer (the short run); the others only in the full run on the direct connection.
BEHAVIOURS = ("tenant_context", "append_only", "ledger", "payments", "webhooks", "jwks", "cursor",
              "money_lots", "money_payments", "money_services")


class Behaviour(PaymentAndUsageBehaviours, MoneyGuarantees):
    """Checks with real rows of two throwaway tenants, in one transaction that the caller rolls back."""

    def __init__(self, conn, rep, group, applied, app_role, marker, exp, full=True):
        self.conn = conn
        self.exp = exp
        self.cur = conn.cursor()
        self.rep = rep
        self.group = group
        self.applied = set(applied)
        self.app_role = app_role
        self.marker = marker
        self.full = full
        self.tenants = {"A": str(uuid.uuid4()), "B": str(uuid.uuid4())}
        self.rows = {}  # relation -> {"A": [keys], "B": [keys]}
        self.self_role = None
        self.superuser = False

    # ---- plumbing
    def has(self, version):
        return version in self.applied

    def tables(self):
        out = []
        for version in self.exp.known_versions:
            if self.has(version):
                out.extend(r for r in self.exp.versions[version]["relations"] if r in self.exp.tenant_tables)
        return out

    def as_app(self):
        if self.self_role != self.app_role:
            self.cur.execute(pgsql.SQL("SET LOCAL ROLE {}").format(pgsql.Identifier(self.app_role)))

    def as_self(self):
        self.cur.execute("SET LOCAL ROLE NONE")

    def context(self, tenant):
        """Tenant 'A'/'B' through app.set_community_context (as the application does), None for no context."""
        if tenant is None:
            self.cur.execute("SELECT set_config('app.community_id', '', true)")
        else:
            self.cur.execute("SELECT app.set_community_context(%s::uuid)", (self.tenants[tenant],))

    def check(self, name, relation, fn, expected=None, version=None, group=None):
        """Run fn in a savepoint: passed (savepoint released) or failed (rolled back), never raised."""
        cur = self.cur
        group = group or self.group
        cur.execute("SAVEPOINT verify_check")
        try:
            observed = fn()
        except CheckFailed as exc:
            cur.execute("ROLLBACK TO SAVEPOINT verify_check")
            return self.rep.add(group, name, relation, False, exc.observed, exc.expected or expected, version)
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT verify_check")
            return self.rep.add(group, name, relation, False, "unexpected error: " + err_text(exc), expected,
                                version)
        except Exception as exc:  # noqa: BLE001 - a check must never end the run with a traceback
            cur.execute("ROLLBACK TO SAVEPOINT verify_check")
            return self.rep.add(group, name, relation, False, "internal error: %s: %s"
                                % (type(exc).__name__, exc), expected, version)
        cur.execute("RELEASE SAVEPOINT verify_check")
        return self.rep.add(group, name, relation, True, observed, expected, version)

    def need(self, rel, tenant):
        keys = self.rows.get(rel, {}).get(tenant)
        if not keys:
            raise CheckFailed("no row of tenant %s in %s to check (its insert failed, see insert_own_rows)" % (tenant, rel))
        return keys

    def one(self, query, params=None):
        self.cur.execute(query, params)
        return self.cur.fetchone()

    # ---- the run
    def run(self):
        cur = self.cur
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.app_role,))
        if cur.fetchone() is None:
            self.rep.add(self.group, "set_role", self.app_role, False,
                         "role %s does not exist: no behaviour can be checked" % self.app_role,
                         "the application role exists")
            return
        cur.execute("SELECT current_user, session_user, pg_has_role(session_user, %s, 'MEMBER'),"
                    " (SELECT rolsuper FROM pg_roles WHERE rolname = session_user)", (self.app_role,))
        current, session, member, superuser = cur.fetchone()
        self.self_role = current
        self.superuser = superuser
        if current != self.app_role and not member:
            self.rep.add(self.group, "set_role", self.app_role, False,
                         "%s cannot SET ROLE %s (not a member): the behaviour checks need the application's rights"
                         % (session, self.app_role), "GRANT %s TO %s" % (self.app_role, session))
            return
        # What to prove comes from the data: each applied version's "behaviours", in version order.
        wanted = [b for v in self.exp.known_versions if self.has(v) for b in self.exp.behaviours.get(v, [])]
        if "tenant_context" not in wanted:
            return  # every behaviour runs inside a tenant's context: nothing to prove without it
        unknown = [b for b in wanted if b not in BEHAVIOURS]
        if unknown:
            raise LedgerError("verify: the .verify.json files name behaviours that verify does not implement: %s"
                              " (implemented: %s)" % (", ".join(unknown), ", ".join(BEHAVIOURS)))
        for name in wanted:
            if name == "tenant_context" or self.full:
                getattr(self, name)()

    def tenant_context(self):
        """The tenant contract with real rows: each tenant's own rows, isolation, no context, no cross-tenant rows."""
        if self.group == "behaviour":
            self.runbook_checks()
        else:
            self.guard_check()
        self.insert_own_rows()
        self.isolation()
        self.no_context()
        self.cross_tenant_inserts()

    def guard_check(self, group=None):
        def fn():
            self.as_app()
            self.context(None)
            out = attempt(self.cur, "SELECT app.current_community_id()")
            if out.sqlstate != "P0001" or "app.community_id is not set" not in ((out.error or {}).get("message") or ""):
                raise CheckFailed("without a context: " + out.describe())
            return "without a context: " + out.describe()
        self.check("guard_raises_p0001", "app.current_community_id()", fn,
                   "ERROR P0001 'app.community_id is not set'", version="0008", group=group)

    def runbook_checks(self):
        # SELECT app.current_community_id(); -- Expected: ERROR: app.community_id is not set (P0001)
        self.guard_check(group="runbook")
        if not self.has("0009"):
            return

        # SET ROLE arrakis_app; SELECT * FROM credit_lots; -- Expected: 0 rows. This ledger deliberately
        # raises P0001 instead: a sweep that forgot its context must fail, not find nothing to do.
        def select_raises():
            self.as_app()
            self.context(None)
            out = attempt(self.cur, "SELECT count(*) FROM public.credit_lots")
            if out.sqlstate != "P0001":
                raise CheckFailed("%s without a context: %s" % (self.app_role, out.describe()))
            return ("%s without a context: %s; this ledger deliberately raises instead of the runbook's '0 rows' (a"
                    " sweep that forgot its context must fail loudly, not see an empty ledger)"
                    % (self.app_role, out.describe()))
        self.check("select_without_context_raises", "public.credit_lots", select_raises,
                   "ERROR P0001 (the runbook says 0 rows; raising is deliberate)", "0009", group="runbook")

        # INSERT INTO credit_lots ... -- Expected: ERROR (RLS blocks without SET LOCAL). Run as the
        # application role: the migration user (a superuser or BYPASSRLS) is not held to RLS.
        def insert_refused():
            self.as_app()
            self.context(None)
            out = attempt(self.cur, "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                          " VALUES (gen_random_uuid(), 'seed', 1000000)")
            if out.sqlstate != "P0001":
                raise CheckFailed("%s without a context: %s" % (self.app_role, out.describe()))
            return "%s without a context: %s" % (self.app_role, out.describe())
        self.check("insert_without_context_refused", "public.credit_lots", insert_refused,
                   "ERROR P0001 (app.community_id is not set)", "0009", group="runbook")

        # SELECT * FROM lot_balances LIMIT 1; -- Expected: no error
        def queryable():
            self.as_self()
            self.cur.execute("SELECT * FROM public.lot_balances LIMIT 1")
            n = len(self.cur.fetchall())
            return "SELECT * FROM lot_balances LIMIT 1 returned %d row(s) without error" % n
        self.check("lot_balances_queryable", "public.lot_balances", queryable, "no error", "0009", group="runbook")

    # ---- rows of two tenants
    def insert_own_rows(self):
        m = self.marker
        inserts = {
            "public.credit_lots": [
                ("INSERT INTO public.credit_lots (community_id, source, payment_id, amount_micro, expires_at)"
                 " VALUES (%(t)s, 'purchase', %(pid)s, %(amount)s, now() + interval '30 days') RETURNING id", {}),
            ],
            "public.crypto_payments": [
                ("INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd, amount_crypto)"
                 " VALUES (%(t)s, %(pid)s, 10.00, 10.5) RETURNING id", {}),
            ],
            "public.usage_events": [
                ("INSERT INTO public.usage_events (event_id, community_id, nft_id, pool_id, tokens_input,"
                 " tokens_output, amount_micro, reservation_id, finalization_id, fence_token)"
                 " VALUES (gen_random_uuid(), %(t)s, 'verify-nft', 'verify-pool', 100, 50, 1500, %(pid)s,"
                 " %(pid)s, 1) RETURNING event_id", {}),
            ],
        }
        amounts = {"A": 10000000, "B": 7000000}
        for rel in self.tables():
            if rel == "public.lot_entries":
                self.check("insert_own_rows", rel, self.insert_entries, "each tenant inserts its own rows")
                continue

            def fn(rel=rel):
                counts = []
                for tenant in ("A", "B"):
                    self.as_app()
                    self.context(tenant)
                    keys = []
                    for query, _unused in inserts[rel]:
                        self.cur.execute(query, {"t": self.tenants[tenant], "amount": amounts[tenant],
                                                 "pid": "verify-%s-%s-%s" % (m, tenant, short(rel))})
                        keys.append(str(self.cur.fetchone()[0]))
                    self.rows.setdefault(rel, {})[tenant] = keys
                    counts.append("tenant %s: %d row(s)" % (tenant, len(keys)))
                return "%s with its tenant context inserted %s" % (self.app_role, ", ".join(counts))
            self.check("insert_own_rows", rel, fn, "each tenant inserts its own rows")
        if self.has("0010") and self.full:
            def webhook():
                self.as_app()
                self.context(None)
                self.cur.execute("INSERT INTO public.webhook_events (provider, event_id, payload)"
                                 " VALUES ('nowpayments', %s, '{\"verify\": true}') RETURNING id",
                                 (webhook_event_ids(m)[0],))
                self.rows["public.webhook_events"] = {"A": [str(self.cur.fetchone()[0])]}
                return "%s inserted a webhook event" % self.app_role
            self.check("insert_own_rows", "public.webhook_events", webhook, "the application inserts webhook events")

    # A known sequence: credited = credit + credit_back, debited = debit + expiry.
    SEQUENCE = {
        "A": [("credit", 10000000, None), ("debit", 2500000, "r1"), ("debit", 1000000, "r2"),
              ("credit_back", 500000, None), ("expiry", 1500000, None)],
        "B": [("credit", 7000000, None), ("debit", 1000000, "r1")],
    }
    EXPECTED_BALANCE = {"A": (10000000, 10500000, 5000000, 5500000), "B": (7000000, 7000000, 1000000, 6000000)}

    def insert_entries(self):
        counts = []
        for tenant in ("A", "B"):
            lot = self.need("public.credit_lots", tenant)[0]
            self.as_app()
            self.context(tenant)
            keys = []
            for entry_type, amount, reservation in self.SEQUENCE[tenant]:
                self.cur.execute("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro,"
                                 " reservation_id, reference_id) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                                 (lot, self.tenants[tenant], entry_type, amount, reservation,
                                  "verify-%s" % self.marker))
                keys.append(str(self.cur.fetchone()[0]))
            self.rows.setdefault("public.lot_entries", {})[tenant] = keys
            counts.append("tenant %s: %d entries" % (tenant, len(keys)))
        return "%s with its tenant context inserted %s" % (self.app_role, ", ".join(counts))

    def relations_for_reads(self):
        rels = list(self.tables())
        if self.has("0009"):
            rels.insert(2, "public.lot_balances")
        return rels

    def isolation(self):
        for rel in self.relations_for_reads():
            source = "public.credit_lots" if rel == "public.lot_balances" else rel
            key = self.exp.key_column[rel]

            def fn(rel=rel, source=source, key=key):
                seen = []
                for tenant, other in (("A", "B"), ("B", "A")):
                    own = self.need(source, tenant)
                    theirs = self.need(source, other)
                    self.as_app()
                    self.context(tenant)
                    q = pgsql.SQL("SELECT count(*) FILTER (WHERE {k}::text = ANY(%s)),"
                                  " count(*) FILTER (WHERE {k}::text = ANY(%s)),"
                                  " count(*) FILTER (WHERE community_id <> %s::uuid) FROM {rel}").format(
                        k=pgsql.Identifier(key), rel=pgsql.SQL(rel))
                    self.cur.execute(q, (own, theirs, self.tenants[tenant]))
                    n_own, n_theirs, n_foreign = self.cur.fetchone()
                    text = "tenant %s sees %d/%d of its rows, %d of tenant %s's, %d of other tenants" % (
                        tenant, n_own, len(own), n_theirs, other, n_foreign)
                    if n_own != len(own) or n_theirs or n_foreign:
                        raise CheckFailed(text)
                    seen.append(text)
                return "; ".join(seen)
            self.check("tenant_isolation", rel, fn, "each tenant sees all its rows and no other tenant's")

    def no_context(self):
        for rel in self.relations_for_reads():
            def fn(rel=rel):
                self.as_app()
                self.context(None)
                out = attempt(self.cur, "SELECT count(*) FROM %s" % rel)
                if out.sqlstate == "P0001":
                    return ("without a context the read raises (%s), deliberately instead of the runbook's 0 rows"
                            % format_pg_error(out.error))
                raise CheckFailed("%s without a context: %s" % (self.app_role, out.describe()))
            self.check("no_context_raises", rel, fn, "ERROR P0001 naming app.community_id")

    def _tenant_insert(self, rel, community, lot=None):
        m = "verify-%s-x-%s" % (self.marker, uuid.uuid4().hex[:6])
        if rel == "public.credit_lots":
            return ("INSERT INTO public.credit_lots (community_id, source, amount_micro) VALUES (%s, 'seed', 1000000)",
                    (community,))
        if rel == "public.lot_entries":
            return ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
                    " VALUES (%s, %s, 'credit', 1000)", (lot, community))
        if rel == "public.crypto_payments":
            return ("INSERT INTO public.crypto_payments (community_id, payment_id, amount_usd) VALUES (%s, %s, 1.00)",
                    (community, m))
        if rel == "public.usage_events":
            return ("INSERT INTO public.usage_events (community_id, amount_micro, finalization_id)"
                    " VALUES (%s, 1, %s)", (community, m))
        raise ValueError(rel)

    def cross_tenant_inserts(self):
        tables = self.tables()
        for rel in tables:
            def foreign(rel=rel):
                lot = self.need("public.credit_lots", "B")[0] if rel == "public.lot_entries" else None
                self.as_app()
                self.context("A")
                query, params = self._tenant_insert(rel, self.tenants["B"], lot)
                out = attempt(self.cur, query, params)
                if not out.error:
                    raise CheckFailed("tenant A inserted a row for tenant B: " + out.describe())
                if out.sqlstate != "42501":
                    raise CheckFailed("tenant A inserting a row of tenant B was refused, but not by row-level"
                                      " security: " + out.describe())
                return "tenant A inserting a row of tenant B: " + out.describe()
            self.check("cross_tenant_insert_refused", rel, foreign, "ERROR 42501 (row-level security)")

            if self.group == "behaviour" and rel == "public.credit_lots":
                continue  # the runbook's check above already covers credit_lots

            def no_ctx(rel=rel):
                lot = self.need("public.credit_lots", "A")[0] if rel == "public.lot_entries" else None
                self.as_app()
                self.context(None)
                query, params = self._tenant_insert(rel, self.tenants["A"], lot)
                out = attempt(self.cur, query, params)
                if out.sqlstate != "P0001":
                    raise CheckFailed("without a context: " + out.describe())
                return "without a context: " + out.describe()
            self.check("insert_without_context_refused", rel, no_ctx, "ERROR P0001 (app.community_id is not set)")

        if "public.lot_entries" in tables:
            # An entry of tenant A that points at tenant B's lot: the tenants of entry and lot must agree.
            def lot_mismatch():
                lot_b = self.need("public.credit_lots", "B")[0]
                self.as_app()
                self.context("A")
                out = attempt(self.cur, *self._tenant_insert("public.lot_entries", self.tenants["A"], lot_b))
                if out.sqlstate != "23503":
                    raise CheckFailed("tenant A's entry on tenant B's lot: " + out.describe())
                return "tenant A's entry on tenant B's lot: " + out.describe()
            self.check("entry_lot_same_tenant", "public.lot_entries", lot_mismatch,
                       "ERROR 23503 (foreign key (lot_id, community_id))")

    # ---- append-only
    def append_only(self):
        for version in self.exp.known_versions:
            if not self.has(version):
                continue
            for rel in self.exp.versions[version]["relations"]:
                if rel not in self.exp.append_only:
                    continue
                self._append_only(rel)

    def _append_only(self, rel):
        col = self.exp.append_only[rel]
        key = "id" if rel != "public.usage_events" else "event_id"
        change = "payload = payload || '{\"verify\": 1}'" if col == "payload" else "%s = %s + 1" % (col, col)
        tenant = "A"

        def target():
            return self.need(rel, tenant)[0]

        for verb in ("UPDATE", "DELETE"):
            stmt = ("UPDATE %s SET %s WHERE %s = %%s" % (rel, change, key) if verb == "UPDATE"
                    else "DELETE FROM %s WHERE %s = %%s" % (rel, key))

            def as_app(stmt=stmt, verb=verb):
                row = target()
                self.as_app()
                self.context(tenant)
                out = attempt(self.cur, stmt, (row,))
                if not out.error:
                    raise CheckFailed("%s's %s %s" % (self.app_role, verb, out.describe()))
                return "%s's %s: %s" % (self.app_role, verb, out.describe())
            self.check("app_%s_refused" % verb.lower(), rel, as_app, "an error (no privilege, P0002)")

            def as_owner(stmt=stmt, verb=verb):
                row = target()
                self.as_self()
                self.context(tenant)
                out = attempt(self.cur, stmt, (row,))
                who = "%s (%s)" % (self.self_role, "superuser" if self.superuser else "migration user")
                if out.sqlstate == "P0002":
                    return "%s's %s: %s" % (who, verb, out.describe())
                if out.sqlstate == "42501":
                    self.cur.execute("SELECT has_table_privilege(current_user, %s, %s)", (rel, verb))
                    if not self.cur.fetchone()[0]:
                        return ("%s's %s: %s; %s holds no %s privilege, so the trigger could not be reached "
                                "(structure.append_only_triggers proves it exists)" % (who, verb, out.describe(),
                                                                                       self.self_role, verb))
                raise CheckFailed("%s's %s: %s" % (who, verb, out.describe()))
            self.check("%s_refused_p0002" % verb.lower(), rel, as_owner, "ERROR P0002 for every role, owner included")

    # ---- the ledger
    def ledger(self):
        if not self.has("0009"):
            return

        def balances():
            lines = []
            for tenant in ("A", "B"):
                lot = self.need("public.credit_lots", tenant)[0]
                self.need("public.lot_entries", tenant)
                self.as_app()
                self.context(tenant)
                row = self.one("SELECT original_micro, credited_micro, debited_micro, remaining_micro"
                               " FROM public.lot_balances WHERE lot_id = %s", (lot,))
                want = self.EXPECTED_BALANCE[tenant]
                text = "tenant %s: original/credited/debited/remaining = %s" % (
                    tenant, "/".join(str(v) for v in row) if row else "no row")
                if row is None or tuple(row) != want:
                    raise CheckFailed(text + " (expected %s)" % "/".join(str(v) for v in want))
                lines.append(text)
            return "; ".join(lines)
        self.check("lot_balances_values", "public.lot_balances", balances,
                   "A: 10000000/10500000/5000000/5500000, B: 7000000/7000000/1000000/6000000")

        def one_debit():
            lot = self.need("public.credit_lots", "A")[0]
            self.as_app()
            self.context("A")
            out = attempt(self.cur, "INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro,"
                          " reservation_id) VALUES (%s, %s, 'debit', 1, 'r1')", (lot, self.tenants["A"]))
            if out.sqlstate != "23505":
                raise CheckFailed("a second debit for reservation r1: " + out.describe())
            return "a second debit for reservation r1: " + out.describe()
        self.check("one_debit_per_reservation", "public.lot_entries", one_debit, "ERROR 23505 (unique)")

        def payment_once():
            self.need("public.credit_lots", "A")
            self.as_app()
            self.context("A")
            out = attempt(self.cur, "INSERT INTO public.credit_lots (community_id, source, payment_id, amount_micro)"
                          " VALUES (%s, 'purchase', %s, 1)",
                          (self.tenants["A"], "verify-%s-A-credit_lots" % self.marker))
            if out.sqlstate != "23505":
                raise CheckFailed("a second lot for the same payment_id: " + out.describe())
            return "a second lot for the same payment_id: " + out.describe()
        self.check("payment_id_mints_once", "public.credit_lots", payment_once, "ERROR 23505 (unique)")

        def status_transition():
            lot_a = self.need("public.credit_lots", "A")[0]
            self.as_app()
            self.context("A")
            self.cur.execute("SELECT app.update_lot_status(%s, 'depleted')", (lot_a,))
            status = self.one("SELECT status FROM public.credit_lots WHERE id = %s", (lot_a,))[0]
            if status != "depleted":
                raise CheckFailed("after app.update_lot_status(lot, 'depleted') the status is %s" % status)
            self.as_self()
            self.cur.execute("SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'relation'"
                             " AND relation = 'public.credit_lots'::regclass AND mode = ANY(%s)", (list(BLOCKING_LOCKS),))
            locks = [r[0] for r in self.cur.fetchall()]
            if locks:
                raise CheckFailed("app.update_lot_status took %s on credit_lots (other sessions' inserts would wait)"
                                  % ", ".join(locks))
            self.as_app()
            self.context("A")
            back = attempt(self.cur, "SELECT app.update_lot_status(%s, 'active')", (lot_a,))
            if not back.error:
                raise CheckFailed("depleted -> active " + back.describe())
            raw = attempt(self.cur, "SELECT set_config('app.lot_status_transition', %s, true);"
                          " UPDATE public.credit_lots SET status = 'expired' WHERE id = %s", (lot_a, lot_a))
            if not raw.error:
                raise CheckFailed("%s changed a lot's status with a plain UPDATE: %s" % (self.app_role, raw.describe()))
            return ("active -> depleted through app.update_lot_status (no lock blocking inserts); depleted -> active %s;"
                    " a direct UPDATE by %s %s" % (back.describe(), self.app_role, raw.describe()))
        self.check("lot_status_transition", "app.update_lot_status(uuid,text)", status_transition,
                   "only active -> expired|depleted, through the function, row lock only", "0009")

        def cross_tenant_status():
            lot_b = self.need("public.credit_lots", "B")[0]
            self.as_app()
            self.context("A")
            out = attempt(self.cur, "SELECT app.update_lot_status(%s, 'expired')", (lot_b,))
            self.context("B")
            status = self.one("SELECT status FROM public.credit_lots WHERE id = %s", (lot_b,))[0]
            if status != "active":
                raise CheckFailed("tenant A changed tenant B's lot to %s (%s)" % (status, out.describe()))
            return "tenant A on tenant B's lot: %s; its status stays active" % out.describe()
        self.check("lot_status_cross_tenant_refused", "app.update_lot_status(uuid,text)", cross_tenant_status,
                   "an error, tenant B's lot unchanged", "0009")
