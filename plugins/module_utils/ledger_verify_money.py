"""verify: the money guarantees that PostgreSQL enforces whoever writes (the application or the owner).

Each is proven with real rows in the behaviour transaction that the caller rolls back; the
versions' .verify.json files name them (money_lots, money_payments, money_services).
"""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    CheckFailed,
    attempt,
    jwks_kid,
)


class MoneyGuarantees(object):
    """Mixed into ledger_verify_behaviour.Behaviour (uses its as_app/as_self/context/need/check)."""

    def _refused(self, who, query, params, sqlstates):
        (self.as_app if who == "app" else self.as_self)()
        out = attempt(self.cur, query, params)
        text = "%s: %s" % (self.app_role if who == "app" else self.self_role, out.describe())
        if out.sqlstate not in sqlstates:
            raise CheckFailed(text)
        return text

    def money_lots(self):
        """0009: no lot overdrawn or over-credited, balances kept by the journal only, the debit path's lock."""
        entry = ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro)"
                 " VALUES (%s, %s, %s, %s)")
        if self.has("0009"):
            def overdraft():
                lot = self.need("public.credit_lots", "A")[0]
                self.need("public.lot_entries", "A")
                self.as_app()
                self.context("A")
                remaining = self.one("SELECT remaining_micro FROM public.lot_balances WHERE lot_id = %s", (lot,))[0]
                seen = []
                for who in ("app", "owner"):
                    for kind, amount in (("debit", remaining + 1), ("expiry", remaining + 1), ("credit", 1),
                                         ("credit_back", 10 ** 15)):
                        seen.append("%s of %s: %s" % (kind, amount, self._refused(
                            who, entry, (lot, self.tenants["A"], kind, amount), ("23514",))))
                return "lot with %s remaining; %s" % (remaining, "; ".join(seen))
            self.check("lot_never_overdrawn", "public.lot_entries", overdraft,
                       "ERROR 23514 for the application and the owner", "0009")

            def matches_journal():
                lines = []
                for tenant in ("A", "B"):
                    lot = self.need("public.credit_lots", tenant)[0]
                    self.as_app()
                    self.context(tenant)
                    view, journal = self.one(
                        "SELECT (SELECT remaining_micro FROM public.lot_balances WHERE lot_id = %s),"
                        " (SELECT sum(CASE WHEN entry_type IN ('credit', 'credit_back') THEN amount_micro"
                        " ELSE -amount_micro END) FROM public.lot_entries WHERE lot_id = %s)", (lot, lot))
                    text = "tenant %s: lot_balances.remaining_micro %s, journal %s" % (tenant, view, journal)
                    if view != journal:
                        raise CheckFailed(text)
                    lines.append(text)
                return "; ".join(lines)
            self.check("balance_matches_journal", "public.credit_lot_balances", matches_journal,
                       "the maintained balance equals the sum of the lot's entries", "0009")

            def journal_only():
                return "; ".join(self._refused(who, "UPDATE public.credit_lot_balances SET debited_micro = 0", None,
                                               ("42501",) if who == "app" else ("P0002",))
                                 for who in ("app", "owner"))
            self.check("balance_written_by_journal_only", "public.credit_lot_balances", journal_only,
                       "ERROR 42501 for the application, P0002 for the owner", "0009")

            def row_lock():
                lot = self.need("public.credit_lots", "B")[0]
                self.as_app()
                self.context("B")
                out = attempt(self.cur, "SELECT l.id FROM public.lot_balances AS b JOIN public.credit_lots AS l"
                              " ON l.id = b.lot_id WHERE l.id = %s FOR UPDATE OF l", (lot,), keep=True)
                if out.error:
                    raise CheckFailed("%s's SELECT ... FOR UPDATE OF credit_lots: %s" % (self.app_role, out.describe()))
                self.cur.execute("SELECT app.update_lot_status(%s, 'depleted')", (lot,))
                again = attempt(self.cur, "SELECT app.update_lot_status(%s, 'depleted')", (lot,), keep=True)
                if again.error:
                    raise CheckFailed("marking a depleted lot again: " + again.describe())
                return ("%s locked its lot FOR UPDATE OF credit_lots and marked it depleted twice (the second a no-op)"
                        % self.app_role)
            self.check("debit_path_locks_lots", "public.credit_lots", row_lock,
                       "the application's lock works; re-marking a final lot is a no-op", "0009")

            def bounded():
                self.context("A")
                return self._refused("app", "INSERT INTO public.credit_lots (community_id, source, amount_micro)"
                                     " VALUES (%s, 'seed', 1000000000000001)", (self.tenants["A"],), ("23514",))
            self.check("amounts_bounded", "public.credit_lots", bounded, "ERROR 23514 above 10^15 micro-USD", "0009")

    def money_payments(self):
        """0010: a payment's final statuses stay final; payment_id is set once."""
        if self.has("0010"):
            def final_status():
                pay = self.need("public.crypto_payments", "A")[0]
                self.as_app()
                self.context("A")
                status = self.one("SELECT status FROM public.crypto_payments WHERE id = %s", (pay,))[0]
                self.cur.execute("UPDATE public.crypto_payments SET status = 'finished', updated_at = now()"
                                 " WHERE id = %s", (pay,))
                texts = ["%s -> finished" % status]
                for who in ("app", "owner"):
                    texts.append("finished -> expired by " + self._refused(
                        who, "UPDATE public.crypto_payments SET status = 'expired' WHERE id = %s", (pay,), ("23514",)))
                    texts.append("payment_id changed by " + self._refused(
                        who, "UPDATE public.crypto_payments SET payment_id = payment_id || '-x' WHERE id = %s",
                        (pay,), ("P0002",)))
                return "; ".join(texts)
            self.check("payment_final_and_id_once", "public.crypto_payments", final_status,
                       "after finished only refunded; payment_id set once (23514 / P0002, app and owner)", "0010")

    def money_services(self):
        """0011: the reconciliation fence never moves back; a key's revocation is never cleared."""
        if self.has("0011"):
            def fence():
                tenant = self.tenants["A"]
                self.as_app()
                self.context(None)
                self.cur.execute("INSERT INTO public.reconciliation_cursor (community_id, last_fence_token)"
                                 " VALUES (%s, 5) ON CONFLICT (community_id) DO UPDATE SET last_fence_token = 5",
                                 (tenant,))
                return "; ".join("fence 5 -> 0 without a compare-and-set by " + self._refused(
                    who, "UPDATE public.reconciliation_cursor SET last_fence_token = 0 WHERE community_id = %s",
                    (tenant,), ("23514",)) for who in ("app", "owner"))
            self.check("fence_never_moves_back", "public.reconciliation_cursor", fence,
                       "ERROR 23514 whatever the statement", "0011")

            def revoke_once():
                kid = jwks_kid(self.marker)
                self.as_app()
                self.cur.execute("UPDATE public.s2s_jwks_public_keys SET revoked_at = now() WHERE kid = %s", (kid,))
                if self.cur.rowcount != 1:
                    raise CheckFailed("%s revoked %d key(s) %s" % (self.app_role, self.cur.rowcount, kid))
                texts = ["%s revoked key %s" % (self.app_role, kid)]
                for who in ("app", "owner"):
                    texts.append("revocation cleared by " + self._refused(
                        who, "UPDATE public.s2s_jwks_public_keys SET revoked_at = NULL WHERE kid = %s", (kid,),
                        ("P0002",)))
                texts.append("material changed by " + self._refused(
                    "owner", "UPDATE public.s2s_jwks_public_keys SET x = x || 'x' WHERE kid = %s", (kid,), ("P0002",)))
                return "; ".join(texts)
            self.check("key_revoked_once", "public.s2s_jwks_public_keys", revoke_once,
                       "the application revokes; a revocation is never cleared, material never changes", "0011")
