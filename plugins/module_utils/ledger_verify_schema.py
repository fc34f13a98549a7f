# -*- coding: utf-8 -*-
"""ledger_verify's knowledge of what the migrations create, its report and the applied versions."""

from __future__ import annotations

import json
import os
import re


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    format_pg_error, pg_error,
    records_exist, redact,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None


# --------------------------------------------------------------------------- what the migrations create (data)
# Each version's guarantees live beside its migration, in NNNN_name.verify.json (files/migrations/README.md):
# schemas, relations (columns and types, view, tenant_scoped, rls, service, key, append_only, app_privileges),
# functions, app_execute, guard/monotonic functions and the behaviours verify proves with real rows.
# Adding a check for a new guarantee is an edit of that file (and, for a new behaviour, a method of
# ledger_verify_behaviour.Behaviour named in it).

VERIFY_FILE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[A-Za-z0-9][A-Za-z0-9_]*)\.verify\.json$")
DEFAULT_MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "files", "migrations")


class Expectations(object):
    """What each version must have, read from the NNNN_name.verify.json files of a migrations directory."""

    def __init__(self, specs, files=None):
        self.specs = dict(specs)
        self.files = dict(files or {})  # version -> the up migration's file name
        self.known_versions = tuple(sorted(self.specs))
        self.versions = dict((v, {"schemas": list(s.get("schemas", [])), "relations": list(s.get("relations", {})),
                                  "functions": list(s.get("functions", []))}) for v, s in self.specs.items())
        rels = {}
        for v in self.known_versions:
            rels.update(self.specs[v].get("relations", {}))
        self.views = set(r for r, d in rels.items() if d.get("view"))
        self.tables = [r for r, d in rels.items() if not d.get("view")]
        self.columns = dict((r, list(d.get("columns", {}).items())) for r, d in rels.items())
        # Tenant tables the application writes with its context; RLS tables also include those the
        # database writes itself (balances); service tables are keyed by community but have no RLS.
        self.tenant_tables = [r for r, d in rels.items() if d.get("tenant_scoped")]
        self.rls_tables = [r for r, d in rels.items() if d.get("tenant_scoped") or d.get("rls")]
        self.service_tables = [r for r, d in rels.items() if d.get("service")]
        self.key_column = dict((r, d["key"]) for r, d in rels.items() if d.get("key"))
        self.append_only = dict((r, d["append_only"]) for r, d in rels.items() if d.get("append_only"))
        self.app_privileges = dict((r, set(d.get("app_privileges", []))) for r, d in rels.items())
        self.app_execute = set(f for s in self.specs.values() for f in s.get("app_execute", []))
        self.guard_function = self._one("guard_function")
        self.monotonic_function = self._one("monotonic_function")
        self.behaviours = dict((v, list(s.get("behaviours", []))) for v, s in self.specs.items())

    def _one(self, key):
        found = [s[key] for s in self.specs.values() if s.get(key)]
        return found[0] if found else None

    def version_of(self, name):
        """The version that creates a relation, function or schema (None when no version does)."""
        for version, spec in self.versions.items():
            if name in spec["relations"] or name in spec["functions"] or name in spec["schemas"]:
                return version
        return None

    @classmethod
    def load(cls, directory=None):
        """Read every NNNN_name.verify.json of `directory` (default: this collection's files/migrations)."""
        directory = os.path.abspath(directory or DEFAULT_MIGRATIONS_DIR)
        if not os.path.isdir(directory):
            raise LedgerError("verify: migrations_dir %s is not a directory (it holds the NNNN_name.verify.json"
                              " files that say what each version must have)" % directory)
        specs, files = {}, {}
        for filename in sorted(os.listdir(directory)):
            m = VERIFY_FILE.match(filename)
            if not m:
                continue
            try:
                with open(os.path.join(directory, filename), encoding="utf-8") as fh:
                    spec = json.load(fh)
            except (OSError, ValueError) as exc:
                raise LedgerError("verify: cannot read %s: %s" % (filename, exc), file=filename)
            if not isinstance(spec, dict) or spec.get("version") != m.group("version"):
                raise LedgerError("verify: %s must be a JSON object whose version is %s" % (filename, m.group("version")),
                                  file=filename)
            specs[m.group("version")] = spec
            files[m.group("version")] = "%s_%s.sql" % (m.group("version"), m.group("name"))
        return cls(specs, files)


# PostgreSQL's vocabulary (not the schema's): privileges, blocking locks, trigger bits.
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


# --------------------------------------------------------------------------- results

class Report:
    """The list of checks, in the order they ran."""

    def __init__(self, exp):
        self.exp = exp
        self.checks = []

    def add(self, group, name, relation, ok, observed, expected=None, version=None):
        status = "passed" if ok else "failed"
        cid = "%s.%s" % (group, name) + (":" + relation if relation else "")
        entry = {"id": cid, "group": group, "name": name, "relation": relation,
                 "version": version or (self.exp.version_of(relation) if relation else None),
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

def applied_versions(cur, exp):
    """(versions, source): from migrations.history, or by the existence of each version's `detect` objects."""
    if records_exist(cur):
        cur.execute("SELECT version FROM migrations.history ORDER BY version")
        versions = [r[0] for r in cur.fetchall()]
        if versions:
            return versions, "history"
    found = []
    for version in exp.known_versions:
        detect = exp.specs[version].get("detect") or {}
        probes = ([("to_regnamespace(%s)", n) for n in detect.get("schemas", [])]
                  + [("to_regclass(%s)", n) for n in detect.get("relations", [])]
                  + [("to_regprocedure(%s)", n) for n in detect.get("functions", [])])
        if not probes:
            continue
        cur.execute("SELECT " + " AND ".join("%s IS NOT NULL" % fn for fn, _name in probes),
                    [name for _fn, name in probes])
        if cur.fetchone()[0]:
            found.append(version)
    return found, "objects"
