# -*- coding: utf-8 -*-
"""ledger_verify's behaviours of 0010 and 0011: payments, webhook dedup, JWKS keys, the reconciliation cursor.

A mixin of ledger_verify_behaviour.Behaviour (self.check, self.need, self.as_app, self.cur, ...),
split off by version so that each file stays small.
"""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    CheckFailed,
    attempt,
    jwks_kid,
    webhook_event_ids,
)


class PaymentAndUsageBehaviours(object):
    """The behaviours the 0010 and 0011 .verify.json files name."""

    def payments(self):
        if not self.has("0010"):
            return

        def monotonic():
            pay = self.need("public.crypto_payments", "A")[0]
            self.cur.execute("SELECT has_column_privilege(%s, 'public.crypto_payments', 'status', 'UPDATE')",
                             (self.app_role,))
            use_app = self.cur.fetchone()[0]
            steps = []
            (self.as_app if use_app else self.as_self)()
            self.context("A")
            rank = self.one("SELECT status, status_rank FROM public.crypto_payments WHERE id = %s", (pay,))
            if tuple(rank) != ("waiting", 0):
                raise CheckFailed("a new payment is %s (rank %s)" % tuple(rank), "waiting (rank 0)")
            steps.append("waiting(0)")
            for status, want in (("confirming", 1), ("finished", 5)):
                out = attempt(self.cur, "UPDATE public.crypto_payments SET status = %s WHERE id = %s"
                              " RETURNING status_rank", (status, pay), keep=True)
                if out.error or out.rows[0][0] != want:
                    raise CheckFailed("%s -> %s: %s" % (steps[-1], status, out.describe() if out.error
                                                        else "status_rank %s (expected %s)" % (out.rows[0][0], want)))
                steps.append("%s(%d)" % (status, want))
            back = attempt(self.cur, "UPDATE public.crypto_payments SET status = 'confirming' WHERE id = %s", (pay,))
            if not back.error:
                raise CheckFailed("finished -> confirming " + back.describe())
            return "as %s: %s; finished -> confirming %s" % (
                self.app_role if use_app else self.self_role, " -> ".join(steps), back.describe())
        self.check("payment_status_monotonic", "public.crypto_payments", monotonic,
                   "forward moves allowed with status_rank maintained; backward refused")

    def webhooks(self):
        if not self.has("0010"):
            return

        def dedup():
            self.as_app()
            self.context(None)
            event = webhook_event_ids(self.marker)[1]
            counts = []
            for _unused in range(2):
                self.cur.execute("INSERT INTO public.webhook_events (provider, event_id, payload)"
                                 " VALUES ('nowpayments', %s, '{}') ON CONFLICT (provider, event_id) DO NOTHING",
                                 (event,))
                counts.append(self.cur.rowcount)
            n = self.one("SELECT count(*) FROM public.webhook_events WHERE provider = 'nowpayments'"
                         " AND event_id = %s", (event,))[0]
            text = "two INSERT ... ON CONFLICT DO NOTHING inserted %d then %d row(s); %d stored" % (
                counts[0], counts[1], n)
            if counts != [1, 0] or n != 1:
                raise CheckFailed(text)
            return text
        self.check("webhook_dedup", "public.webhook_events", dedup, "1 then 0 rows, 1 stored")

    def jwks(self):
        if not self.has("0011"):
            return

        def keys():
            kid = jwks_kid(self.marker)
            self.as_app()
            self.context(None)
            self.cur.execute("INSERT INTO public.s2s_jwks_public_keys (kid, x, y, issuer, expires_at)"
                             " VALUES (%s, 'verify-x', 'verify-y', 'freeside', now() + interval '1 hour')", (kid,))
            rows = self.one("SELECT count(*) FROM public.s2s_jwks_public_keys WHERE issuer = 'freeside'"
                            " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) AND kid = %s",
                            (kid,))[0]
            if rows != 1:
                raise CheckFailed("%s inserted key %s but reads %d active row(s) for it" % (self.app_role, kid, rows))
            return "%s inserted key %s and reads it among freeside's active keys" % (self.app_role, kid)
        self.check("jwks_keys_readable", "public.s2s_jwks_public_keys", keys, "insert and read active keys")

    def cursor(self):
        if not self.has("0011"):
            return

        def advance():
            event = (self.rows.get("public.usage_events", {}).get("A") or [None])[0]
            self.as_app()
            self.context(None)  # the reconciler is a service, not a tenant
            for tenant in ("A", "B"):
                self.cur.execute("INSERT INTO public.reconciliation_cursor (community_id, last_fence_token)"
                                 " VALUES (%s, 1)", (self.tenants[tenant],))
            self.rows["public.reconciliation_cursor"] = {t: [self.tenants[t]] for t in ("A", "B")}
            self.cur.execute("UPDATE public.reconciliation_cursor SET last_fence_token = 2,"
                             " last_processed_event_id = %s, last_reconciled_at = now(), drift_micro = 0,"
                             " updated_at = now() WHERE community_id = %s AND last_fence_token = 1",
                             (event, self.tenants["A"]))
            updated = self.cur.rowcount
            token = self.one("SELECT last_fence_token FROM public.reconciliation_cursor WHERE community_id = %s",
                             (self.tenants["A"],))[0]
            text = ("without a tenant context: created at fence 1, compare-and-set advanced %d row(s), now at fence %s"
                    % (updated, token))
            if updated != 1 or token != 2:
                raise CheckFailed(text)
            return text
        self.check("reconciliation_cursor_advanced", "public.reconciliation_cursor", advance,
                   "created, then advanced to fence 2")
