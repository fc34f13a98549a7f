# -*- coding: utf-8 -*-
"""ledger_verify's structure checks: relations, columns, RLS, triggers, privileges, the runbook's catalog queries."""

from __future__ import annotations


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import (
    EVENTS,
    TABLE_PRIVILEGES,
    TG_BEFORE,
    TG_INSERT,
    TG_ROW,
    TG_UPDATE,
)


# --------------------------------------------------------------------------- structure

# pg_policy.polcmd
POLICY_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


def _rel_info(cur, rel):
    cur.execute("""SELECT c.oid, c.relkind, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
                          pg_get_userbyid(c.relowner)
                     FROM pg_class c WHERE c.oid = to_regclass(%s)""", (rel,))
    return cur.fetchone()


def _truthy_option(options, name):
    for opt in options or []:
        key, _unused, value = opt.partition("=")
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


def append_only_observation(triggers, guard_function):
    """(ok, observed) for the append-only guard of one table."""
    listed = ", ".join(_describe_trigger(*t) for t in triggers if t[3] == guard_function) or "no trigger calls %s()" % guard_function
    problems = []
    for event, bit in EVENTS:
        if _guarded(triggers, guard_function, bit):
            continue
        present = [t for t in triggers if t[3] == guard_function and t[2] & bit]
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
        key, _unused, value = item.partition("=")
        if key == "search_path":
            return [e.strip().strip('"') for e in value.split(",") if e.strip()]
    return None


def check_structure(cur, rep, applied, source, app_role, exp):
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

    for version in exp.known_versions:
        spec = exp.versions[version]
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
            want_view = rel in exp.views
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
            for col, typ in exp.columns[rel]:
                if col not in actual:
                    wrong.append("%s missing" % col)
                elif typ and actual[col] != typ:
                    wrong.append("%s is %s (expected %s)" % (col, actual[col], typ))
            rep.add("structure", "columns", rel, not wrong,
                    "; ".join(wrong) if wrong else "%d expected columns with their types" % len(exp.columns[rel]),
                    version=version)
            if want_view:
                invoker = _truthy_option(options, "security_invoker")
                rep.add("structure", "view_security_invoker", rel, invoker,
                        "reloptions %s" % (options or "{}"), "security_invoker=true (the caller's RLS applies)",
                        version=version)
            if rel in exp.rls_tables:
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
                        ("policies: %s" % ", ".join("%s (%s)" % (p[0], POLICY_COMMANDS[p[1]]) for p in pols))
                        if pols else "no policy (RLS would hide every row, or is not enforced as designed)",
                        "a permissive policy for %s covering SELECT and INSERT" % app_role, version=version)
            if rel in exp.append_only:
                ok, observed = append_only_observation(_triggers(cur, rel), exp.guard_function)
                rep.add("structure", "append_only_triggers", rel, ok, observed,
                        "enabled BEFORE UPDATE, DELETE and TRUNCATE triggers calling %s()" % exp.guard_function,
                        version=version)
            if rel == "public.crypto_payments":
                trig = _triggers(cur, rel)
                good = _guarded(trig, exp.monotonic_function, TG_UPDATE, row_only=True)
                listed = ", ".join(_describe_trigger(*t) for t in trig) or "no trigger"
                rep.add("structure", "monotonicity_trigger", rel, bool(good), listed,
                        "an enabled BEFORE UPDATE row trigger calling %s()" % exp.monotonic_function, version=version)
            if role_row:
                held = _privileges(cur, app_role, rel)
                expected = exp.app_privileges[rel]
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
                want = fn in exp.app_execute
                rep.add("structure", "app_privileges", fn, can == want,
                        "%s %s EXECUTE" % (app_role, "holds" if can else "does not hold"),
                        "EXECUTE" if want else "no EXECUTE", version=version)

    # Any other SECURITY DEFINER function in schema app is held to the same rules.
    if "0008" in applied:
        known = {f for v in exp.versions.values() for f in v["functions"]}
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


def check_runbook_catalog(cur, rep, applied, exp):
    """The runbook's catalog queries (step 2), with a verdict instead of a listing."""
    if "0009" in applied:
        info = _rel_info(cur, "public.credit_lots")
        rep.add("runbook", "credit_lots_relrowsecurity", "public.credit_lots", bool(info and info[2]),
                "relrowsecurity = %s" % (info[2] if info else "(table missing)"), "t", version="0009")
    if "0010" in applied:
        trig = _triggers(cur, "public.crypto_payments")
        ok = bool(_guarded(trig, exp.monotonic_function, TG_UPDATE, row_only=True))
        rep.add("runbook", "crypto_payments_triggers", "public.crypto_payments", ok,
                "tgname: %s" % (", ".join(_describe_trigger(*t) for t in trig) or "none"),
                "the status monotonicity trigger, enabled", version="0010")
    if "0011" in applied:
        ok, observed = append_only_observation(_triggers(cur, "public.usage_events"), exp.guard_function)
        rep.add("runbook", "usage_events_triggers", "public.usage_events", ok, "tgname: " + observed,
                "the append-only triggers, enabled", version="0011")
