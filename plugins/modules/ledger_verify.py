#!/usr/bin/python
# -*- coding: utf-8 -*-
"""The runbook's post-migration checks and staging checklist, proven on the target itself."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_verify
short_description: Prove the ledger's guarantees on a migrated PostgreSQL target, leaving no trace
description:
  - Runs every verification of the applied ledger migrations (0008-0011) in one call and returns
    each check by name, passed or failed with the relation concerned and what was observed.
  - Structure (catalog) checks, the runbook's own post-migration checks, and behaviour with real
    rows of two throwaway tenants as the application role, inside one transaction that is always
    rolled back (every check in a savepoint, so one failure does not hide the others).
  - Only the applied migrations are checked (C(migrations.history), or object existence when
    there is no history); with a history, the objects of unapplied migrations must be absent.
  - With O(pgbouncer_url), the tenant-context checks run again through PgBouncer (transaction
    pooling) and a leak check proves a transaction-local context never reaches the next client's
    transaction on the same server connection.
  - With O(health_url) / O(jwks_url), the application's health endpoint must answer 200 within
    O(http_timeout) and its JWKS C(kid)s must equal the active keys of C(s2s_jwks_public_keys).
  - Leaves nothing behind, proven cheaply on a production-sized ledger (no full count of any
    table) - after the rollback, no row of its two throwaway tenants (looked up by
    C(community_id), indexed) nor with its own webhook event ids or JWKS kid (looked up by key)
    remains; settings and catalog object counts are equal before and after.
    On a real run it appends one C(verify) event to C(migrations.events) in its own short
    transaction; in check mode it writes nothing. Never reports changed.
options:
  database_url: {description: libpq URI of the target (the migration user)., type: str, required: true}
  app_role: {description: The application role whose rights are verified (SET LOCAL ROLE)., type: str, default: arrakis_app}
  pgbouncer_url: {description: libpq URI of the same database through PgBouncer in transaction mode., type: str}
  health_url:
    description:
      - The application's health endpoint (HTTP 200 expected).
      - May carry credentials (user:password@ is sent as HTTP basic auth, or a token in the query); never
        shown, checks name it as host:port/path only.
    type: str
  jwks_url: {description: "The application's JWKS endpoint (JSON with a keys array); never shown, like O(health_url).", type: str}
  jwks_issuer: {description: Compare only the active keys of this issuer (default all issuers)., type: str}
  http_timeout: {description: Seconds the HTTP endpoints have to answer., type: float, default: 5}
  statement_timeout_ms: {description: statement_timeout of the verification transaction., type: int, default: 30000}
  lock_timeout_ms: {description: lock_timeout of the verification transaction (never queue the application)., type: int, default: 2000}
  leak_attempts: {description: Attempts to land two PgBouncer clients on the same server connection., type: int, default: 20}
  run_id: {description: Run id recorded with the verify event., type: str}
  record_event: {description: Append a verify event to migrations.events on a real run., type: bool, default: true}
  limit: {description: The inventory limit used in the next-command hints., type: str, default: "<environment>"}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
author: ledger-migrations
"""

EXAMPLES = r"""
- name: Verify the ledger on the target
  ledger_verify:
    database_url: "{{ verify_database_url }}"
    pgbouncer_url: "{{ verify_pgbouncer_url | default(omit) }}"
    health_url: https://app.example.org/healthz
    limit: staging
"""

RETURN = r"""
checks: {description: "Every check: id, group, name, relation, version, status (passed/failed/skipped), observed, expected.", type: list, returned: always}
failed_checks: {description: Ids of the failed checks., type: list, returned: always}
passed: {description: Number of passed checks., type: int, returned: always}
versions: {description: The applied versions that were verified., type: list, returned: always}
versions_source: {description: "history (migrations.history) or objects (detected by existence).", type: str, returned: always}
leftover_rows: {description: "Rows of verify's tenants and keys still present after its rollback, per table ({} when none).", type: dict, returned: always}
event_logged: {description: Whether a verify event was appended to migrations.events., type: bool, returned: always}
verification_failed: {description: "True when a check failed or verify could not run (also under failed_when: false).", type: bool, returned: always}
"""

import json
import re
import socket
import base64
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.ledger_common import (
    LedgerError, connect, describe_target, format_pg_error, log_event_autonomous, new_run_id, pg_error,
    records_exist, redact,
)

try:
    import psycopg2
    import psycopg2.sql as pgsql
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
    pgsql = None

ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    app_role=dict(type="str", default="arrakis_app"),
    pgbouncer_url=dict(type="str", no_log=True),
    health_url=dict(type="str", no_log=True),
    jwks_url=dict(type="str", no_log=True),
    jwks_issuer=dict(type="str"),
    http_timeout=dict(type="float", default=5),
    statement_timeout_ms=dict(type="int", default=30000),
    lock_timeout_ms=dict(type="int", default=2000),
    leak_attempts=dict(type="int", default=20),
    run_id=dict(type="str"),
    record_event=dict(type="bool", default=True),
    limit=dict(type="str", default="<environment>"),
    connect_timeout=dict(type="int", default=10),
)

# --------------------------------------------------------------------------- what the migrations create
# Names, columns and grants are fixed by the ledger issue and files/migrations/*.sql.

KNOWN_VERSIONS = ("0008", "0009", "0010", "0011")

TS = "timestamp with time zone"
VERSIONS = {
    "0008": {"schemas": ["app"], "relations": [],
             "functions": ["app.current_community_id()", "app.set_community_context(uuid)",
                           "public.require_tenant_context()"]},
    "0009": {"relations": ["public.credit_lots", "public.lot_entries", "public.credit_lot_balances",
                           "public.lot_balances"],
             "functions": ["public.prevent_mutation()", "app.update_lot_status(uuid,text)",
                           "public.open_lot_balance()", "public.apply_lot_entry()"]},
    "0010": {"relations": ["public.webhook_events", "public.crypto_payments"],
             "functions": ["public.enforce_payment_status_monotonicity()"]},
    "0011": {"relations": ["public.usage_events", "public.s2s_jwks_public_keys", "public.reconciliation_cursor"],
             "functions": ["public.guard_jwks_key()", "public.guard_reconciliation_fence()"]},
}
VIEWS = {"public.lot_balances"}

COLUMNS = {
    "public.credit_lots": [("id", "uuid"), ("community_id", "uuid"), ("source", "text"), ("payment_id", "text"),
                           ("amount_micro", "bigint"), ("status", "text"), ("expires_at", TS), ("created_at", TS)],
    "public.lot_entries": [("id", "uuid"), ("lot_id", "uuid"), ("community_id", "uuid"), ("entry_type", "text"),
                           ("amount_micro", "bigint"), ("reservation_id", "text"), ("usage_event_id", "text"),
                           ("reference_id", "text"), ("created_at", TS)],
    "public.credit_lot_balances": [("lot_id", "uuid"), ("community_id", "uuid"), ("amount_micro", "bigint"),
                                   ("credit_micro", "bigint"), ("credit_back_micro", "bigint"),
                                   ("debited_micro", "bigint"), ("remaining_micro", "bigint")],
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

# Tenant tables the application writes with its context, and the column that identifies verify's rows.
TENANT_TABLES = ["public.credit_lots", "public.lot_entries", "public.crypto_payments", "public.usage_events"]
# RLS enabled and forced (the balances are written by the database, read through lot_balances).
RLS_TABLES = TENANT_TABLES + ["public.credit_lot_balances"]
# Keyed by community but kept by a service without a tenant (no RLS, by design).
SERVICE_TABLES = ["public.reconciliation_cursor"]
KEY_COLUMN = {"public.credit_lots": "id", "public.lot_entries": "id", "public.crypto_payments": "id",
              "public.usage_events": "event_id",
              "public.lot_balances": "lot_id"}
# Append-only tables and a column whose change must be refused.
APPEND_ONLY = {"public.credit_lots": "amount_micro", "public.lot_entries": "amount_micro",
               "public.webhook_events": "payload", "public.usage_events": "amount_micro"}
GUARD_FUNCTION = "public.prevent_mutation"
MONOTONIC_FUNCTION = "public.enforce_payment_status_monotonicity"

# Exactly what arrakis_app holds (files/migrations: the GRANTs of 0009-0011).
APP_PRIVILEGES = {
    # UPDATE(status): what SELECT ... FOR UPDATE OF credit_lots needs; the trigger refuses the rest.
    "public.credit_lots": {"SELECT", "INSERT", "UPDATE(status)"},
    "public.lot_entries": {"SELECT", "INSERT"},
    "public.credit_lot_balances": {"SELECT"},
    "public.lot_balances": {"SELECT"},
    "public.webhook_events": {"SELECT", "INSERT"},
    "public.crypto_payments": {"SELECT", "INSERT", "UPDATE(amount_crypto,checkout_url,credits_mint_lot_id,"
                                                   "credits_minted_at,metadata,payment_id,status,updated_at)"},
    "public.usage_events": {"SELECT", "INSERT"},
    "public.s2s_jwks_public_keys": {"SELECT", "INSERT", "UPDATE(revoked_at)"},
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


# --------------------------------------------------------------------------- structure

def _rel_info(cur, rel):
    cur.execute("""SELECT c.oid, c.relkind, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
                          pg_get_userbyid(c.relowner)
                     FROM pg_class c WHERE c.oid = to_regclass(%s)""", (rel,))
    return cur.fetchone()


def _truthy_option(options, name):
    for opt in options or []:
        key, _, value = opt.partition("=")
        if key == name:
            return value.lower() in ("true", "on", "1", "yes")
    return False


def _triggers(cur, rel):
    cur.execute("""SELECT t.tgname, t.tgenabled, t.tgtype, n.nspname || '.' || p.proname
                     FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                     JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE t.tgrelid = to_regclass(%s) AND NOT t.tgisinternal ORDER BY t.tgname""", (rel,))
    return cur.fetchall()


def _describe_trigger(tgname, enabled, tgtype, func):
    events = [e for e, bit in (("INSERT", TG_INSERT),) + EVENTS if tgtype & bit]
    state = {"O": "enabled", "A": "enabled always", "R": "enabled on replicas only", "D": "disabled"}.get(enabled, enabled)
    return "%s (%s %s, %s, %s)" % (tgname, "BEFORE" if tgtype & TG_BEFORE else "AFTER", "/".join(events),
                                   func + "()", state)


def _guarded(triggers, func, event_bit, row_only=False):
    """Enabled BEFORE triggers calling func that fire on this event."""
    return [t for t in triggers if t[3] == func and t[1] in ("O", "A") and t[2] & TG_BEFORE and t[2] & event_bit
            and (not row_only or t[2] & TG_ROW)]


def append_only_observation(triggers):
    """(ok, observed) for the append-only guard of one table."""
    listed = ", ".join(_describe_trigger(*t) for t in triggers if t[3] == GUARD_FUNCTION) or "no trigger calls %s()" % GUARD_FUNCTION
    problems = []
    for event, bit in EVENTS:
        if _guarded(triggers, GUARD_FUNCTION, bit):
            continue
        present = [t for t in triggers if t[3] == GUARD_FUNCTION and t[2] & bit]
        if present:
            problems.append("%s not guarded (%s)" % (event, ", ".join(
                "trigger %s is %s" % (t[0], "disabled" if t[1] == "D" else "enabled on replicas only" if t[1] == "R"
                                      else "AFTER, not BEFORE") for t in present)))
        else:
            problems.append("%s not guarded (no trigger)" % event)
    if problems:
        return False, "; ".join(problems) + "; triggers: " + listed
    return True, listed


def _privileges(cur, role, rel):
    cur.execute(
        """SELECT p.priv, has_table_privilege(%(role)s, %(rel)s::regclass, p.priv),
                  ARRAY(SELECT a.attname::text FROM pg_attribute a
                         WHERE a.attrelid = %(rel)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
                           AND p.priv IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')
                           AND has_column_privilege(%(role)s, a.attrelid, a.attnum, p.priv)
                         ORDER BY a.attname)
             FROM unnest(%(privs)s::text[]) AS p(priv)""",
        {"role": role, "rel": rel, "privs": list(TABLE_PRIVILEGES)})
    held = set()
    for priv, table_level, columns in cur.fetchall():
        if table_level:
            held.add(priv)
        elif columns:
            held.add("%s(%s)" % (priv, ",".join(columns)))
    return held


def _search_path_entries(proconfig):
    for item in proconfig or []:
        key, _, value = item.partition("=")
        if key == "search_path":
            return [e.strip().strip('"') for e in value.split(",") if e.strip()]
    return None


def check_structure(cur, rep, applied, source, app_role):
    """Catalog checks for every applied version (and absence for unapplied ones, with a history)."""
    cur.execute("SELECT oid, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", (app_role,))
    role_row = cur.fetchone()
    if applied:
        if role_row is None:
            rep.add("structure", "app_role", app_role, False, "role %s does not exist" % app_role,
                    "the application role exists", version="0008")
        else:
            cur.execute("""SELECT r.rolname FROM pg_roles r
                            WHERE (r.rolsuper OR r.rolbypassrls) AND pg_has_role(%s, r.oid, 'MEMBER')""", (app_role,))
            powerful = [r[0] for r in cur.fetchall()]
            rep.add("structure", "app_role", app_role, not powerful,
                    "%s is or inherits SUPERUSER/BYPASSRLS through: %s" % (app_role, ", ".join(powerful)) if powerful
                    else "%s is neither superuser nor BYPASSRLS (nor a member of such a role)" % app_role,
                    "no SUPERUSER, no BYPASSRLS", version="0008")

    for version in KNOWN_VERSIONS:
        spec = VERSIONS[version]
        if version not in applied:
            if source == "history":
                present = []
                for rel in spec["relations"]:
                    if _rel_info(cur, rel):
                        present.append(rel)
                for fn in spec["functions"]:
                    cur.execute("SELECT to_regprocedure(%s) IS NOT NULL", (fn,))
                    if cur.fetchone()[0]:
                        present.append(fn)
                for schema in spec.get("schemas", []):
                    cur.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
                    if cur.fetchone()[0]:
                        present.append("schema " + schema)
                rep.add("structure", "not_applied_absent", "version " + version, not present,
                        "still present although %s is not in migrations.history: %s" % (version, ", ".join(present))
                        if present else "none of its objects exist", "no object of an unapplied migration",
                        version=version)
            continue

        for schema in spec.get("schemas", []):
            cur.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
            exists = cur.fetchone()[0]
            rep.add("structure", "schema_exists", schema, exists, "schema %s %s" % (schema, "exists" if exists else "is missing"),
                    version=version)
            if exists and role_row:
                cur.execute("SELECT has_schema_privilege(%s, %s, 'USAGE'), has_schema_privilege(%s, %s, 'CREATE')",
                            (app_role, schema, app_role, schema))
                usage, create = cur.fetchone()
                rep.add("structure", "app_privileges", "schema " + schema, usage and not create,
                        "%s holds %s on schema %s" % (app_role, ", ".join([p for p, h in (("USAGE", usage), ("CREATE", create)) if h]) or "nothing", schema),
                        "USAGE only", version=version)

        for rel in spec["relations"]:
            info = _rel_info(cur, rel)
            want_view = rel in VIEWS
            if info is None:
                rep.add("structure", "relation_exists", rel, False, "%s %s is missing" % ("view" if want_view else "table", rel),
                        version=version)
                continue
            oid, relkind, rls, forced, options, owner = info
            kind_ok = relkind == ("v" if want_view else "r") or (not want_view and relkind == "p")
            rep.add("structure", "relation_exists", rel, kind_ok,
                    "%s exists (relkind %s, owner %s)" % (rel, relkind, owner), "a %s" % ("view" if want_view else "table"),
                    version=version)
            cur.execute("""SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
                            WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped""", (oid,))
            actual = dict(cur.fetchall())
            wrong = []
            for col, typ in COLUMNS[rel]:
                if col not in actual:
                    wrong.append("%s missing" % col)
                elif typ and actual[col] != typ:
                    wrong.append("%s is %s (expected %s)" % (col, actual[col], typ))
            rep.add("structure", "columns", rel, not wrong,
                    "; ".join(wrong) if wrong else "%d expected columns with their types" % len(COLUMNS[rel]),
                    version=version)
            if want_view:
                invoker = _truthy_option(options, "security_invoker")
                rep.add("structure", "view_security_invoker", rel, invoker,
                        "reloptions %s" % (options or "{}"), "security_invoker=true (the caller's RLS applies)",
                        version=version)
            if rel in RLS_TABLES:
                rep.add("structure", "rls_enabled", rel, rls, "relrowsecurity = %s" % rls, "true", version=version)
                rep.add("structure", "rls_forced", rel, forced, "relforcerowsecurity = %s" % forced, "true",
                        version=version)
                cur.execute("""SELECT polname, polcmd, polpermissive,
                                      polroles = '{0}' OR %s = ANY(polroles)
                                 FROM pg_policy WHERE polrelid = %s ORDER BY polname""",
                            (role_row[0] if role_row else 0, oid))
                pols = cur.fetchall()
                usable = [p for p in pols if p[2] and p[3]]
                covers = {c for p in usable for c in (("r", "a") if p[1] == "*" else (p[1],))}
                ok = {"r", "a"} <= covers
                rep.add("structure", "rls_policies", rel, ok,
                        ("policies: %s" % ", ".join("%s (%s)" % (p[0], {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}[p[1]]) for p in pols))
                        if pols else "no policy (RLS would hide every row, or is not enforced as designed)",
                        "a permissive policy for %s covering SELECT and INSERT" % app_role, version=version)
            if rel in APPEND_ONLY:
                ok, observed = append_only_observation(_triggers(cur, rel))
                rep.add("structure", "append_only_triggers", rel, ok, observed,
                        "enabled BEFORE UPDATE, DELETE and TRUNCATE triggers calling %s()" % GUARD_FUNCTION,
                        version=version)
            if rel == "public.crypto_payments":
                trig = _triggers(cur, rel)
                good = _guarded(trig, MONOTONIC_FUNCTION, TG_UPDATE, row_only=True)
                listed = ", ".join(_describe_trigger(*t) for t in trig) or "no trigger"
                rep.add("structure", "monotonicity_trigger", rel, bool(good), listed,
                        "an enabled BEFORE UPDATE row trigger calling %s()" % MONOTONIC_FUNCTION, version=version)
            if role_row:
                held = _privileges(cur, app_role, rel)
                expected = APP_PRIVILEGES[rel]
                extra, missing = sorted(held - expected), sorted(expected - held)
                text = "%s holds %s" % (app_role, ", ".join(sorted(held)) or "nothing")
                if extra:
                    text += "; unexpected: " + ", ".join(extra)
                if missing:
                    text += "; missing: " + ", ".join(missing)
                rep.add("structure", "app_privileges", rel, not extra and not missing, text,
                        ", ".join(sorted(expected)), version=version)
            if role_row:
                cur.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (app_role, owner))
                owns = cur.fetchone()[0]
                rep.add("structure", "app_not_owner", rel, not owns,
                        "owner %s%s" % (owner, " (%s can act as the owner: ALTER, DROP TRIGGER, DISABLE RLS)" % app_role if owns else ""),
                        "not owned by %s or a role it belongs to" % app_role, version=version)

        for fn in spec["functions"]:
            cur.execute("""SELECT p.oid, p.prosecdef, p.proconfig,
                                  EXISTS (SELECT 1 FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) a
                                           WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
                             FROM pg_proc p WHERE p.oid = to_regprocedure(%s)""", (fn,))
            row = cur.fetchone()
            if row is None:
                rep.add("structure", "function_exists", fn, False, "function %s is missing" % fn, version=version)
                continue
            oid, secdef, config, public_exec = row
            rep.add("structure", "function_exists", fn, True,
                    "%s exists%s" % (fn, " (SECURITY DEFINER)" if secdef else ""), version=version)
            entries = _search_path_entries(config)
            if entries is None:
                ok, observed = False, "search_path not pinned (proconfig %s)" % (config or "{}")
            else:
                unsafe = []
                for schema in entries[:-1]:
                    if schema == "pg_catalog":
                        continue
                    cur.execute("SELECT to_regnamespace(%s) IS NULL OR has_schema_privilege(%s, %s, 'CREATE')",
                                (schema, app_role if role_row else "public", schema))
                    if cur.fetchone()[0]:
                        unsafe.append(schema)
                ok = bool(entries) and entries[-1] == "pg_temp" and not unsafe
                observed = "search_path=%s" % ", ".join(entries)
                if entries and entries[-1] != "pg_temp":
                    observed += " (pg_temp is not last: a temporary object could hijack an unqualified name)"
                if unsafe:
                    observed += " (schemas writable by %s or missing: %s)" % (app_role, ", ".join(unsafe))
            rep.add("structure", "function_search_path", fn, ok, observed, "search_path = pg_catalog, pg_temp",
                    version=version)
            rep.add("structure", "function_no_public_execute", fn, not public_exec,
                    "PUBLIC %s EXECUTE" % ("holds" if public_exec else "does not hold"),
                    "EXECUTE revoked from PUBLIC", version=version)
            if role_row:
                cur.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (app_role, oid))
                can = cur.fetchone()[0]
                want = fn in APP_EXECUTE
                rep.add("structure", "app_privileges", fn, can == want,
                        "%s %s EXECUTE" % (app_role, "holds" if can else "does not hold"),
                        "EXECUTE" if want else "no EXECUTE", version=version)

    # Any other SECURITY DEFINER function in schema app is held to the same rules.
    if "0008" in applied:
        known = {f for v in VERSIONS.values() for f in v["functions"]}
        cur.execute("""SELECT p.oid::regprocedure::text, p.proconfig,
                              EXISTS (SELECT 1 FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) a
                                       WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')
                         FROM pg_proc p WHERE p.pronamespace = to_regnamespace('app') AND p.prosecdef""")
        for sig, config, public_exec in cur.fetchall():
            if sig.replace(" ", "") in known:
                continue
            entries = _search_path_entries(config)
            rep.add("structure", "function_search_path", sig, bool(entries) and entries[-1] == "pg_temp",
                    "search_path=%s" % (", ".join(entries) if entries else "not pinned"),
                    "search_path = pg_catalog, pg_temp", version="0008")
            rep.add("structure", "function_no_public_execute", sig, not public_exec,
                    "PUBLIC %s EXECUTE" % ("holds" if public_exec else "does not hold"), "EXECUTE revoked from PUBLIC",
                    version="0008")


def check_runbook_catalog(cur, rep, applied):
    """The runbook's catalog queries (step 2), with a verdict instead of a listing."""
    if "0009" in applied:
        info = _rel_info(cur, "public.credit_lots")
        rep.add("runbook", "credit_lots_relrowsecurity", "public.credit_lots", bool(info and info[2]),
                "relrowsecurity = %s" % (info[2] if info else "(table missing)"), "t", version="0009")
    if "0010" in applied:
        trig = _triggers(cur, "public.crypto_payments")
        ok = bool(_guarded(trig, MONOTONIC_FUNCTION, TG_UPDATE, row_only=True))
        rep.add("runbook", "crypto_payments_triggers", "public.crypto_payments", ok,
                "tgname: %s" % (", ".join(_describe_trigger(*t) for t in trig) or "none"),
                "the status monotonicity trigger, enabled", version="0010")
    if "0011" in applied:
        ok, observed = append_only_observation(_triggers(cur, "public.usage_events"))
        rep.add("runbook", "usage_events_triggers", "public.usage_events", ok, "tgname: " + observed,
                "the append-only triggers, enabled", version="0011")


# --------------------------------------------------------------------------- behaviour

class Behaviour:
    """Checks with real rows of two throwaway tenants, in one transaction that the caller rolls back."""

    def __init__(self, conn, rep, group, applied, app_role, marker, full=True):
        self.conn = conn
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
        for version in KNOWN_VERSIONS:
            if self.has(version):
                out.extend(r for r in VERSIONS[version]["relations"] if r in TENANT_TABLES)
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
        if not self.has("0008"):
            return
        if self.group == "behaviour":
            self.runbook_checks()
        else:
            self.guard_check()
        self.insert_own_rows()
        self.isolation()
        self.no_context()
        self.cross_tenant_inserts()
        if self.full:
            self.append_only()
            self.ledger()
            self.payments()
            self.webhooks()
            self.jwks()
            self.cursor()
            self.guarantees()

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
                    for query, _ in inserts[rel]:
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
            key = KEY_COLUMN[rel]

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
        for version in KNOWN_VERSIONS:
            if not self.has(version):
                continue
            for rel in VERSIONS[version]["relations"]:
                if rel not in APPEND_ONLY:
                    continue
                self._append_only(rel)

    def _append_only(self, rel):
        col = APPEND_ONLY[rel]
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
            for _ in range(2):
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

    # ---- money guarantees (issue 12): enforced by PostgreSQL whoever writes, app or owner
    def _refused(self, who, query, params, sqlstates):
        (self.as_app if who == "app" else self.as_self)()
        out = attempt(self.cur, query, params)
        text = "%s: %s" % (self.app_role if who == "app" else self.self_role, out.describe())
        if out.sqlstate not in sqlstates:
            raise CheckFailed(text)
        return text

    def guarantees(self):
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


# --------------------------------------------------------------------------- PgBouncer

def leak_check(url, rep, attempts, connect_timeout, app_schema):
    """Client A sets a transaction-local context and commits; client B's next transaction on the
    same server connection must see no context (app.current_community_id() raises P0001)."""
    name, rel = "context_does_not_leak", "app.community_id"
    try:
        a = connect(url, autocommit=False, connect_timeout=connect_timeout)
        b = connect(url, autocommit=False, connect_timeout=connect_timeout)
    except LedgerError as exc:
        return rep.add("pgbouncer", name, rel, False, exc.msg)
    try:
        ca, cb = a.cursor(), b.cursor()
        pids = []
        for _ in range(max(1, attempts)):
            tenant = str(uuid.uuid4())
            ca.execute("SELECT pg_backend_pid()")
            pid_a = ca.fetchone()[0]
            if app_schema:
                ca.execute("SELECT app.set_community_context(%s::uuid)", (tenant,))
            else:
                ca.execute("SELECT set_config('app.community_id', %s, true)", (tenant,))
            ca.execute("SELECT current_setting('app.community_id', true)")
            if ca.fetchone()[0] != tenant:
                a.rollback()
                return rep.add("pgbouncer", name, rel, False, "client A could not set a context in its transaction")
            a.commit()
            cb.execute("SELECT pg_backend_pid(), current_setting('app.community_id', true)")
            pid_b, seen = cb.fetchone()
            pids.append((pid_a, pid_b))
            if pid_b != pid_a:
                b.rollback()
                continue
            guard = "not called (0008 not applied)"
            leaked = seen not in (None, "")
            if app_schema:
                try:
                    cb.execute("SELECT app.current_community_id()")
                    value = cb.fetchone()[0]
                    leaked = True
                    guard = "returned %s" % value
                except psycopg2.Error as exc:
                    guard = "raised " + err_text(exc)
                    if exc.pgcode != "P0001":
                        leaked = True
            b.rollback()
            text = ("client A (server pid %d) set app.community_id with set_config(..., true) and committed;"
                    " client B's next transaction on the same server connection (pid %d) sees %r;"
                    " app.current_community_id() %s" % (pid_a, pid_b, seen, guard))
            return rep.add("pgbouncer", name, rel, not leaked, text,
                           "no context in client B's transaction (P0001)")
        return rep.add("pgbouncer", name, rel, False,
                       "client B never landed on client A's server connection in %d attempts (pids %s): PgBouncer is"
                       " not in transaction pooling mode, or the pool is busy; re-run, or use a pool of size 1"
                       % (len(pids), ", ".join("%s/%s" % p for p in pids[:5])),
                       "two clients sharing one server connection")
    except psycopg2.Error as exc:
        return rep.add("pgbouncer", name, rel, False, "unexpected error: " + err_text(exc))
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- HTTP

def _safe_url(url):
    """host:port/path of an endpoint: never its scheme-complete text, user, password or query.

    health_url and jwks_url are no_log (they may carry credentials), and Ansible masks any
    text that contains such a value; the label never contains it, so checks stay readable.
    """
    if not url:
        return ""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        if ":" in host:
            host = "[%s]" % host
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    label = "%s%s%s" % (host, ":%d" % port if port else "", parts.path or "/")
    if parts.query:
        label += "?<query hidden>"
    return label


def http_get(url, timeout):
    """(status, body, seconds) of a GET; raises OSError/URLError on no answer.

    user:password@ in the URL is sent as HTTP basic auth (urllib would not).
    """
    headers = {"Accept": "application/json", "User-Agent": "ledger-verify"}
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:
        creds = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        headers["Authorization"] = "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")
        netloc = parts.netloc.rsplit("@", 1)[1]
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    req = urllib.request.Request(url, headers=headers)
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
            body = resp.read(2000000)
            return resp.status, body, time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000) if exc.fp else b"", time.monotonic() - start


def check_health(rep, url, timeout):
    name = "health"
    try:
        status, _, took = http_get(url, timeout)
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return rep.add("http", name, _safe_url(url), False, "no answer within %gs: %s" % (timeout, reason),
                       "HTTP 200 within %gs" % timeout)
    ok = status == 200 and took <= timeout
    return rep.add("http", name, _safe_url(url), ok, "HTTP %s in %.2fs" % (status, took),
                   "HTTP 200 within %gs" % timeout)


def check_jwks(rep, cur, url, timeout, issuer, applied):
    name = "jwks"
    if "0011" not in applied:
        return rep.skip("http", name, _safe_url(url), "0011 (s2s_jwks_public_keys) is not applied")
    try:
        status, body, took = http_get(url, timeout)
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return rep.add("http", name, _safe_url(url), False, "no answer within %gs: %s" % (timeout, reason))
    if status != 200:
        return rep.add("http", name, _safe_url(url), False, "HTTP %s in %.2fs" % (status, took), "HTTP 200")
    try:
        doc = json.loads(body.decode("utf-8"))
        keys = doc["keys"]
        if not isinstance(keys, list):
            raise TypeError("keys is a %s" % type(keys).__name__)
        kids = [k["kid"] for k in keys]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return rep.add("http", name, _safe_url(url), False,
                       "not a JWKS document (a JSON object whose keys array holds objects with a kid): %s" % exc)
    query = ("SELECT kid FROM public.s2s_jwks_public_keys WHERE revoked_at IS NULL"
             " AND (expires_at IS NULL OR expires_at > now())")
    params = ()
    if issuer:
        query += " AND issuer = %s"
        params = (issuer,)
    cur.execute(query + " ORDER BY kid", params)
    active = [r[0] for r in cur.fetchall()]
    served = set(kids)
    missing, extra = sorted(set(active) - served), sorted(served - set(active))
    dupes = sorted({k for k in kids if kids.count(k) > 1})
    text = "endpoint serves %d key(s), the database has %d active" % (len(kids), len(active))
    if missing:
        text += "; active but not served: " + ", ".join(missing)
    if extra:
        text += "; served but not active (revoked, expired or unknown): " + ", ".join(extra)
    if dupes:
        text += "; served twice: " + ", ".join(dupes)
    return rep.add("http", name, _safe_url(url), not (missing or extra or dupes), text,
                   "the kids of the active rows of s2s_jwks_public_keys%s" % (" (issuer %s)" % issuer if issuer else ""))


# --------------------------------------------------------------------------- traces

LEDGER_TABLES = ["public.credit_lots", "public.lot_entries", "public.webhook_events", "public.crypto_payments",
                 "public.usage_events", "public.s2s_jwks_public_keys", "public.reconciliation_cursor"]


def applied_tables(applied):
    return [rel for rel in LEDGER_TABLES if version_of(rel) in applied]


def object_snapshot(cur):
    cur.execute("""SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname IN ('public', 'app')),
                          (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE n.nspname IN ('public', 'app')),
                          (SELECT count(*) FROM pg_trigger), (SELECT count(*) FROM pg_policy),
                          (SELECT count(*) FROM pg_namespace),
                          (SELECT count(*) FROM pg_db_role_setting),
                          (SELECT count(*) FROM pg_roles)""")
    return dict(zip(("relations", "functions", "triggers", "policies", "schemas", "role_settings", "roles"),
                    cur.fetchone()))


def leftover_rows(conn, tenants, markers, applied, statement_timeout_ms):
    """Rows verify created that are still there after its rollback ({} when none), per table.

    Exact and cheap on a production-sized ledger: every row verify writes carries one of its
    two throwaway tenants' community_id (indexed in every tenant table) or one of its own keys
    (webhook_events (provider, event_id) and s2s_jwks_public_keys kid, both unique). No table
    is counted in full. Each tenant is read under its own context (forced row-level security).
    """
    cur = conn.cursor()
    found = {}
    try:
        conn.autocommit = False
        cur.execute("SELECT set_config('statement_timeout', %s, true)", (str(statement_timeout_ms),))
        for rel in applied_tables(applied):
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (rel,))
            if not cur.fetchone()[0]:
                continue
            n = 0
            if rel in TENANT_TABLES + SERVICE_TABLES:
                for tenant in tenants:
                    if "0008" in applied:
                        cur.execute("SELECT set_config('app.community_id', %s, true)", (tenant,))
                    cur.execute("SELECT count(*) FROM %s WHERE community_id = %%s::uuid" % rel, (tenant,))
                    n += cur.fetchone()[0]
            elif rel == "public.webhook_events":
                cur.execute("SELECT count(*) FROM public.webhook_events WHERE provider = 'nowpayments'"
                            " AND event_id = ANY(%s)", ([e for m in markers for e in webhook_event_ids(m)],))
                n = cur.fetchone()[0]
            elif rel == "public.s2s_jwks_public_keys":
                cur.execute("SELECT count(*) FROM public.s2s_jwks_public_keys WHERE kid = ANY(%s)",
                            ([jwks_kid(m) for m in markers],))
                n = cur.fetchone()[0]
            if n:
                found[short(rel)] = n
    finally:
        conn.rollback()
        conn.autocommit = True
    return found


# --------------------------------------------------------------------------- the run

def run_behaviour(conn, rep, group, applied, app_role, marker, full, statement_timeout_ms, lock_timeout_ms):
    """One transaction, always rolled back; returns the tenants it used."""
    conn.autocommit = False
    beh = Behaviour(conn, rep, group, applied, app_role, marker, full=full)
    try:
        cur = beh.cur
        cur.execute("SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true),"
                    " set_config('idle_in_transaction_session_timeout', '60000', true)",
                    (str(statement_timeout_ms), str(lock_timeout_ms)))
        beh.run()
    finally:
        conn.rollback()
        conn.autocommit = True
    return list(beh.tenants.values())


MIGRATION_FILES = {"0008": "0008_tenant_context_guard.sql", "0009": "0009_credit_lots_lot_entries.sql",
                   "0010": "0010_webhook_events_crypto_payments.sql", "0011": "0011_usage_events_pg.sql"}


def next_steps(failed, limit):
    groups = {c["group"] for c in failed}
    steps = []
    if groups & {"structure", "runbook", "behaviour", "cleanup"}:
        versions = sorted({c["version"] for c in failed if c.get("version") in KNOWN_VERSIONS})
        steps.append("look for drift: 'ansible-playbook playbooks/status.yml -l %s'" % limit)
        if versions:
            prev = KNOWN_VERSIONS[KNOWN_VERSIONS.index(versions[0]) - 1] if versions[0] != "0008" else "base"
            steps.append("repair the objects named above as files/migrations/%s define%s them (where the ledger"
                         " holds no data worth keeping, 'ansible-playbook playbooks/rollback.yml -l %s -e rollback_to=%s'"
                         " then 'ansible-playbook playbooks/migrate.yml -l %s' re-creates them: reverting drops"
                         " their data; or restore the backup: 'ansible-playbook playbooks/rollback.yml -l %s"
                         " -e rollback_mode=restore')"
                         % (", ".join(MIGRATION_FILES[v] for v in versions), "s" if len(versions) == 1 else "",
                            limit, prev, limit, limit))
    if "pgbouncer" in groups:
        steps.append("check PgBouncer: pool_mode = transaction, and the application sets its tenant with"
                     " app.set_community_context() / set_config(..., true) inside a transaction, never SET")
    if "http" in groups:
        steps.append("check the application (its logs; 'curl -sS -m 5 <url>'); the JWKS endpoint must serve"
                     " exactly the active rows of s2s_jwks_public_keys")
    steps.append("then re-run 'ansible-playbook playbooks/verify.yml -l %s'" % limit)
    return "; ".join(steps)


def format_failure(target, failed, total, versions, limit):
    lines = ["verify failed on %s: %d of %d checks failed (verified versions: %s)"
             % (target, len(failed), total, ", ".join(versions) or "none")]
    for c in failed:
        line = "- %s on %s: %s" % (c["group"] + "." + c["name"], c["relation"] or "-", c["observed"])
        if c.get("expected"):
            line += " (expected: %s)" % c["expected"]
        lines.append(line)
    lines.append("Next: " + next_steps(failed, limit) + ".")
    return "\n".join(lines)


def abort(check_mode, p, url, run_id, result, msg, **extra):
    """verify could not finish: log that (real runs) and fail with the message."""
    if not check_mode and p["record_event"]:
        result["event_logged"] = log_event_autonomous(url, run_id, "verify", "error",
                                                      detail={"target": result["target"], "error": msg})
    raise LedgerError(msg, **dict(result, **extra))


def run(p, check_mode=False):
    """Every check on one target; the result, or LedgerError(msg, **result) when verification failed."""
    url = p["database_url"]
    target = describe_target(url)
    run_id = p["run_id"] or new_run_id()
    rep = Report()
    result = {"changed": False, "target": target, "run_id": run_id, "checks": rep.checks, "failed_checks": [],
              "verification_failed": True,
              "passed": 0, "versions": [], "versions_source": None, "leftover_rows": {}, "event_logged": False}
    started = time.monotonic()
    marker = uuid.uuid4().hex[:12]
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    except LedgerError as exc:
        raise LedgerError("%s. Next: check database_url and that the target is up ('ansible-playbook"
                          " playbooks/precheck.yml -l %s')." % (exc.msg, p["limit"]), **result)
    try:
        cur = conn.cursor()
        applied, source = applied_versions(cur)
        known = [v for v in applied if v in KNOWN_VERSIONS]
        result.update(versions=known, versions_source=source,
                      unknown_versions=[v for v in applied if v not in KNOWN_VERSIONS])
        objects_before = object_snapshot(cur)

        check_structure(cur, rep, known, source, p["app_role"])
        check_runbook_catalog(cur, rep, known)
        tenants = run_behaviour(conn, rep, "behaviour", known, p["app_role"], marker, True,
                                p["statement_timeout_ms"], p["lock_timeout_ms"])

        if p["pgbouncer_url"]:
            if known:
                try:
                    bconn = connect(p["pgbouncer_url"], autocommit=True, connect_timeout=p["connect_timeout"])
                except LedgerError as exc:
                    rep.add("pgbouncer", "connect", describe_target(p["pgbouncer_url"]), False, exc.msg)
                else:
                    try:
                        tenants += run_behaviour(bconn, rep, "pgbouncer", known, p["app_role"], marker + "p", False,
                                                 p["statement_timeout_ms"], p["lock_timeout_ms"])
                    finally:
                        bconn.close()
            leak_check(p["pgbouncer_url"], rep, p["leak_attempts"], p["connect_timeout"], "0008" in known)

        if p["health_url"]:
            check_health(rep, p["health_url"], p["http_timeout"])
        if p["jwks_url"]:
            check_jwks(rep, cur, p["jwks_url"], p["http_timeout"], p["jwks_issuer"], known)

        # Nothing left behind: rows (by verify's own tenants and keys), settings, objects.
        markers = [marker, marker + "p"]
        leftovers = leftover_rows(conn, tenants, markers, known, p["statement_timeout_ms"])
        result["leftover_rows"] = leftovers
        tables = [short(rel) for rel in applied_tables(known)]
        rep.add("cleanup", "no_rows_left", None, not leftovers,
                ("verify's rows remain after its rollback: %s" % leftovers) if leftovers else
                "no row of verify's %d tenant(s) or keys in %s" % (len(tenants), ", ".join(tables) or "no ledger table"),
                "none of verify's rows (its tenants' community_id, its webhook event ids and JWKS kid)")
        cur.execute("SELECT current_setting('app.community_id', true), current_user::text, session_user::text")
        setting, cur_user, sess_user = cur.fetchone()
        rep.add("cleanup", "no_settings_left", None, setting in (None, "") and cur_user == sess_user,
                "app.community_id = %r, current_user = %s" % (setting, cur_user), "no context, role reset")
        objects_after = object_snapshot(cur)
        rep.add("cleanup", "no_objects_left", None, objects_after == objects_before,
                "catalog counts before %s, after %s" % (objects_before, objects_after), "equal")
    except LedgerError as exc:
        conn.close()
        abort(check_mode, p, url, run_id, result, "verify could not run on %s: %s" % (target, exc.msg))
    except psycopg2.Error as exc:
        conn.close()
        abort(check_mode, p, url, run_id, result,
              "verify could not run on %s: %s. Next: check the target's health, then re-run"
              " 'ansible-playbook playbooks/verify.yml -l %s'." % (target, err_text(exc), p["limit"]),
              sqlstate=exc.pgcode)
    except Exception as exc:  # noqa: BLE001 - an operator gets a message, never a traceback
        conn.close()
        abort(check_mode, p, url, run_id, result,
              "verify could not run on %s: internal error %s: %s. Next: re-run with -vvv and report it"
              % (target, type(exc).__name__, redact(str(exc))))
    conn.close()

    failed = rep.failed()
    result["failed_checks"] = [c["id"] for c in failed]
    result["passed"] = sum(1 for c in rep.checks if c["status"] == "passed")
    result["duration_ms"] = int((time.monotonic() - started) * 1000)
    outcome = "failed" if failed else "passed"
    if not check_mode and p["record_event"]:
        result["event_logged"] = log_event_autonomous(
            url, run_id, "verify", outcome, duration_ms=result["duration_ms"],
            detail={"target": target, "versions": result["versions"], "passed": result["passed"],
                    "failed": result["failed_checks"], "pgbouncer": bool(p["pgbouncer_url"]),
                    "health_url": _safe_url(p["health_url"]) or None, "jwks_url": _safe_url(p["jwks_url"]) or None})
    result["verification_failed"] = bool(failed)
    if failed:
        raise LedgerError(format_failure(target, failed, len(rep.checks), result["versions"], p["limit"]), **result)
    if not result["versions"]:
        result["msg"] = "verify on %s: no ledger migration applied, nothing to verify (%d checks passed)" % (
            target, result["passed"])
    else:
        result["msg"] = "verify passed on %s: %d checks (versions %s%s)" % (
            target, result["passed"], ", ".join(result["versions"]), ", through PgBouncer too" if p["pgbouncer_url"] else "")
    return result


SPEC_OPTIONS = {}


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_verify.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    try:
        return run(params, check_mode=check_mode)
    except LedgerError as exc:
        return dict(exc.fields, failed=True, msg=exc.msg)
    except Exception as exc:  # noqa: BLE001 - an operator gets a message, never a traceback
        return dict(failed=True, changed=False,
                    msg="verify could not run on %s: internal error %s: %s. Next: re-run with -vvv and report it"
                        % (describe_target(params["database_url"]), type(exc).__name__, redact(str(exc))))


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True, **SPEC_OPTIONS)
    result = result_of(module.params, check_mode=module.check_mode)
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
