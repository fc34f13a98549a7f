# -*- coding: utf-8 -*-
"""ledger_verify's knowledge of what the migrations create, its report and the applied versions."""

from __future__ import annotations


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    format_pg_error, pg_error,
    records_exist, redact,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None


# --------------------------------------------------------------------------- what the migrations create
# Names, columns and grants are fixed by the ledger issue and files/migrations/*.sql.

KNOWN_VERSIONS = ("0008", "0009", "0010", "0011")

TS = "timestamp with time zone"
VERSIONS = {
    "0008": {"schemas": ["app"], "relations": [],
             "functions": ["app.current_community_id()", "app.set_community_context(uuid)"]},
    "0009": {"relations": ["public.credit_lots", "public.lot_entries", "public.lot_balances"],
             "functions": ["public.prevent_mutation()", "app.update_lot_status(uuid,text)"]},
    "0010": {"relations": ["public.webhook_events", "public.crypto_payments"],
             "functions": ["public.enforce_payment_status_monotonicity()"]},
    "0011": {"relations": ["public.usage_events", "public.s2s_jwks_public_keys", "public.reconciliation_cursor"],
             "functions": []},
}
VIEWS = {"public.lot_balances"}

COLUMNS = {
    "public.credit_lots": [("id", "uuid"), ("community_id", "uuid"), ("source", "text"), ("payment_id", "text"),
                           ("amount_micro", "bigint"), ("status", "text"), ("expires_at", TS), ("created_at", TS)],
    "public.lot_entries": [("id", "uuid"), ("lot_id", "uuid"), ("community_id", "uuid"), ("entry_type", "text"),
                           ("amount_micro", "bigint"), ("reservation_id", "text"), ("usage_event_id", "text"),
                           ("reference_id", "text"), ("created_at", TS)],
    "public.lot_balances": [("lot_id", "uuid"), ("community_id", "uuid"), ("source", "text"),
                            ("original_micro", "bigint"), ("status", "text"), ("expires_at", TS), ("created_at", TS),
                            ("credited_micro", "bigint"), ("debited_micro", "bigint"), ("remaining_micro", "bigint")],
    "public.webhook_events": [("id", None), ("provider", "text"), ("event_id", "text"), ("payload", "jsonb"),
                              ("processed_at", TS)],
    "public.crypto_payments": [("id", "uuid"), ("community_id", "uuid"), ("payment_id", "text"), ("provider", "text"),
                               ("amount_usd", "numeric(12,2)"), ("amount_crypto", "numeric(24,8)"),
                               ("currency", "text"), ("status", "text"), ("status_rank", "integer"),
                               ("checkout_url", "text"), ("credits_minted_at", TS), ("credits_mint_lot_id", "uuid"),
                               ("metadata", "jsonb"), ("created_at", TS), ("updated_at", TS)],
    "public.usage_events": [("event_id", "uuid"), ("community_id", "uuid"), ("nft_id", "text"), ("pool_id", "text"),
                            ("tokens_input", "integer"), ("tokens_output", "integer"), ("amount_micro", "bigint"),
                            ("reservation_id", "text"), ("finalization_id", "text"), ("fence_token", "bigint"),
                            ("conservation_guard_result", "boolean"), ("conservation_guard_violations", "jsonb"),
                            ("created_at", TS)],
    "public.s2s_jwks_public_keys": [("kid", "text"), ("kty", "text"), ("crv", "text"), ("x", "text"), ("y", "text"),
                                    ("issuer", "text"), ("created_at", TS), ("expires_at", TS), ("revoked_at", TS)],
    "public.reconciliation_cursor": [("community_id", "uuid"), ("last_processed_event_id", "uuid"),
                                     ("last_fence_token", "bigint"), ("last_reconciled_at", TS),
                                     ("drift_micro", "bigint"), ("updated_at", TS)],
}

# Tenant-scoped tables (RLS enabled and forced) and the column that identifies verify's rows.
TENANT_TABLES = ["public.credit_lots", "public.lot_entries", "public.crypto_payments", "public.usage_events",
                 "public.reconciliation_cursor"]
KEY_COLUMN = {"public.credit_lots": "id", "public.lot_entries": "id", "public.crypto_payments": "id",
              "public.usage_events": "event_id", "public.reconciliation_cursor": "community_id",
              "public.lot_balances": "lot_id"}
# Append-only tables and a column whose change must be refused.
APPEND_ONLY = {"public.credit_lots": "amount_micro", "public.lot_entries": "amount_micro",
               "public.webhook_events": "payload", "public.usage_events": "amount_micro"}
GUARD_FUNCTION = "public.prevent_mutation"
MONOTONIC_FUNCTION = "public.enforce_payment_status_monotonicity"

# Exactly what arrakis_app holds (files/migrations: the GRANTs of 0009-0011).
APP_PRIVILEGES = {
    "public.credit_lots": {"SELECT", "INSERT"},
    "public.lot_entries": {"SELECT", "INSERT"},
    "public.lot_balances": {"SELECT"},
    "public.webhook_events": {"SELECT", "INSERT"},
    "public.crypto_payments": {"SELECT", "INSERT", "UPDATE(amount_crypto,checkout_url,credits_mint_lot_id,"
                                                   "credits_minted_at,metadata,status)"},
    "public.usage_events": {"SELECT", "INSERT"},
    "public.s2s_jwks_public_keys": {"SELECT", "INSERT"},
    "public.reconciliation_cursor": {"SELECT", "INSERT", "UPDATE(drift_micro,last_fence_token,"
                                                         "last_processed_event_id,last_reconciled_at,updated_at)"},
}
APP_EXECUTE = {"app.current_community_id()", "app.set_community_context(uuid)", "app.update_lot_status(uuid,text)"}
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
# Locks that would make other sessions' INSERTs wait (they conflict with ROW EXCLUSIVE).
BLOCKING_LOCKS = ("ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")

# pg_trigger.tgtype bits
TG_ROW = 1
TG_BEFORE = 2
TG_INSERT = 4
TG_DELETE = 8
TG_UPDATE = 16
TG_TRUNCATE = 32
EVENTS = (("UPDATE", TG_UPDATE), ("DELETE", TG_DELETE), ("TRUNCATE", TG_TRUNCATE))


def webhook_event_ids(marker):
    """The event_ids of the webhook_events rows a behaviour run with this marker inserts."""
    return ["verify-%s-setup" % marker, "verify-%s-dedup" % marker]


def jwks_kid(marker):
    """The kid of the s2s_jwks_public_keys row a behaviour run with this marker inserts."""
    return "verify-%s" % marker


def short(rel):
    """public.credit_lots -> credit_lots (messages stay readable)."""
    return rel.split(".", 1)[1] if rel.startswith("public.") else rel


def version_of(rel):
    for version, spec in VERSIONS.items():
        if rel in spec["relations"] or rel in spec["functions"] or rel in spec.get("schemas", []):
            return version
    return None


# --------------------------------------------------------------------------- results

class Report:
    """The list of checks, in the order they ran."""

    def __init__(self):
        self.checks = []

    def add(self, group, name, relation, ok, observed, expected=None, version=None):
        status = "passed" if ok else "failed"
        cid = "%s.%s" % (group, name) + (":" + relation if relation else "")
        entry = {"id": cid, "group": group, "name": name, "relation": relation,
                 "version": version or (version_of(relation) if relation else None),
                 "status": status, "observed": redact(observed)}
        if expected is not None:
            entry["expected"] = expected
        self.checks.append(entry)
        return ok

    def skip(self, group, name, relation, reason):
        self.checks.append({"id": "%s.%s" % (group, name) + (":" + relation if relation else ""), "group": group,
                            "name": name, "relation": relation, "version": None, "status": "skipped",
                            "observed": reason})

    def failed(self):
        return [c for c in self.checks if c["status"] == "failed"]


class CheckFailed(Exception):
    """Raised inside a check: the observation that makes it fail."""

    def __init__(self, observed, expected=None):
        super(CheckFailed, self).__init__(observed)
        self.observed = observed
        self.expected = expected


def err_text(exc):
    return format_pg_error(pg_error(exc))


class Outcome:
    def __init__(self, rows=None, rowcount=None, error=None):
        self.rows = rows
        self.rowcount = rowcount
        self.error = error

    @property
    def sqlstate(self):
        return self.error["sqlstate"] if self.error else None

    def describe(self):
        if self.error:
            return "refused (%s)" % format_pg_error(self.error)
        return "succeeded (%s row(s))" % self.rowcount


def attempt(cur, query, params=None, keep=False):
    """Run one statement in its own savepoint; an error is returned, never raised.

    keep=False rolls the statement back even when it succeeded (used for statements
    that must be refused: if one is not, its effect must not leak into later checks).
    """
    cur.execute("SAVEPOINT verify_attempt")
    try:
        cur.execute(query, params)
        rows = cur.fetchall() if cur.description else None
        out = Outcome(rows=rows, rowcount=cur.rowcount)
    except psycopg2.Error as exc:
        cur.execute("ROLLBACK TO SAVEPOINT verify_attempt")
        return Outcome(error=pg_error(exc))
    cur.execute(("RELEASE" if keep else "ROLLBACK TO") + " SAVEPOINT verify_attempt")
    return out


# --------------------------------------------------------------------------- applied versions

def applied_versions(cur):
    """(versions, source): from migrations.history, or by the existence of each version's objects."""
    if records_exist(cur):
        cur.execute("SELECT version FROM migrations.history ORDER BY version")
        versions = [r[0] for r in cur.fetchall()]
        if versions:
            return versions, "history"
    cur.execute("""SELECT to_regnamespace('app') IS NOT NULL AND to_regprocedure('app.current_community_id()') IS NOT NULL,
                          to_regclass('public.credit_lots') IS NOT NULL,
                          to_regclass('public.crypto_payments') IS NOT NULL,
                          to_regclass('public.usage_events') IS NOT NULL""")
    flags = cur.fetchone()
    return [v for v, present in zip(KNOWN_VERSIONS, flags) if present], "objects"
