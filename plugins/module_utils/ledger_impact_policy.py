# -*- coding: utf-8 -*-
"""The lock policy over an impact profile (issue 14), the stamp that carries it, and squawk's view.

The policy: a lock stronger than SHARE UPDATE EXCLUSIVE on a pre-existing table
with more than ``threshold`` estimated rows, or a rewrite of such a table, is an
*impact*; ``-- ledger:allow-lock schema.table`` in a file's header declares it
intended. Production judges staging's profile (the promotion stamp) at its own table sizes.
squawk's verdict on the same statements is compared with what was observed
(``compare_squawk``). The profile itself is measured by ledger_impact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_impact import BYTES_PER_ROW_GUESS, is_strong


def impacts(results, threshold):
    """The impacts of a profiled rehearsal: [{file, version, line, table, lock, rewrite, rows, allowed, work_line}].

    ``results`` are the rehearsal's per-file results (each with ``impact`` and ``allow_lock``). A
    strong lock (above SHARE UPDATE EXCLUSIVE) on a large pre-existing table is an impact when the
    file does work on that table while holding it: a rewrite, or reading its rows (a scan, an index
    build, a validation), in that statement or a later one of the file (the lock is held until the
    file's transaction ends). A strong lock without work (ADD COLUMN without a volatile default,
    a NOT VALID constraint) is brief: no impact. A rewrite is always one.
    """
    out = []
    for r in results:
        allowed = set(r.get("allow_lock") or [])
        held = {}  # table -> (lock, line) of the strongest lock this file took on it so far
        flagged = set()
        for st in r.get("impact") or []:
            documented = not st.get("observed", True)
            for rel in st.get("relations") or []:
                if rel.get("kind") not in ("table", "materialized view"):
                    continue
                table = rel["table"]
                if is_strong(rel.get("lock")) and not is_strong((held.get(table) or (None,))[0]):
                    held[table] = (rel["lock"], st["line"])
                rows = rel.get("rows")
                if rows is None or rows <= threshold or table in flagged:
                    continue
                read = rel.get("rows_read") or 0
                # Work: a rewrite, or reading a good part of the table (not a few index look-ups).
                working = rel.get("rewrite") or read > threshold or read * 10 >= rows or documented
                if not working or table not in held:
                    continue
                flagged.add(table)
                lock, line = held[table]
                out.append({"table": table, "lock": lock, "rewrite": bool(rel.get("rewrite")), "rows": rows,
                            "rows_guessed": bool(rel.get("rows_guessed")), "file": r["filename"],
                            "version": r["version"], "line": line, "work_line": st["line"],
                            "statement": st.get("statement"), "observed": not documented,
                            "allowed": table in allowed})
    return out


def describe_impact(i):
    what = []
    if i.get("lock"):
        what.append("%s lock" % i["lock"])
    if i.get("rewrite"):
        what.append("a rewrite")
    work = "" if i.get("work_line") in (None, i["line"]) else ", held while line %s works on it" % i["work_line"]
    return "%s line %s: %s on %s (%s%s rows%s%s)" % (
        i["file"], i["line"], " and ".join(what) or "impact", i["table"], "~" if i.get("rows_guessed") else "",
        i["rows"], ", never ANALYZEd: estimated from its size" if i.get("rows_guessed") else "", work)


def policy_verdict(found, policy, threshold):
    """(passed, message, next) of the lock policy for the impacts found."""
    blocking = [i for i in found if not i["allowed"]]
    allowed = [i for i in found if i["allowed"]]
    said = []
    if allowed:
        said.append("%d intended by -- ledger:allow-lock (%s)" % (len(allowed), "; ".join(
            describe_impact(i) for i in allowed)))
    if not blocking:
        return True, ("no lock impact above %d rows%s" % (threshold, (": " + said[0]) if said else "")), None
    msg = "%d lock impact(s) on tables above %d estimated rows: %s%s" % (
        len(blocking), threshold, "; ".join(describe_impact(i) for i in blocking), ("; " + said[0]) if said else "")
    first = blocking[0]
    nxt = ("make the change without the strong lock or the rewrite (CREATE INDEX CONCURRENTLY in a "
           "'-- ledger:no-transaction' file, a nullable column then a batched backfill, NOT VALID then VALIDATE), "
           "or declare the impact intended with a header line '-- ledger:allow-lock %s' in %s and run it in a "
           "maintenance window" % (first["table"], first["file"]))
    if policy == "refuse":
        return False, "migrate_lock_policy=refuse: " + msg, nxt
    return True, "migrate_lock_policy=warn: " + msg, nxt


# --------------------------------------------------------------------------- the stamp

def stamp_profile(results):
    """The profile of a rehearsal as carried in a promotion stamp (per file, per statement)."""
    out = []
    for r in results or []:
        if r.get("impact") is None:
            continue
        out.append({"version": r["version"], "filename": r["filename"], "allow_lock": r.get("allow_lock") or [],
                    "statements": r["impact"]})
    return out


def from_stamp(profile, pending, rows_here, threshold):
    """Production's view of staging's profile: impacts at production's table sizes, and size differences.

    ``profile`` is the stamp's (stamp_profile()), ``pending`` the pending Migration objects here,
    ``rows_here`` {schema.table: estimated rows on this target}. Returns (results, heavy, differences):
    results shaped as the rehearsal's (for impacts()), heavy {(filename, line): reason} statements not
    to rehearse here, differences [{table, staging_rows, rows}] beyond 10x.
    """
    by_file = dict((p.get("filename"), p) for p in profile or [] if isinstance(p, dict))
    results, heavy, differences, seen = [], {}, [], set()
    for m in pending:
        p = by_file.get(m.filename)
        if p is None:
            continue
        statements = []
        for st in p.get("statements") or []:
            rels = []
            for rel in st.get("relations") or []:
                rel = dict(rel)
                here = rows_here.get(rel.get("table"))
                staged = rel.get("rows")
                if here is not None:
                    if rel["table"] not in seen and _differs(staged, here):
                        seen.add(rel["table"])
                        differences.append({"table": rel["table"], "staging_rows": staged, "rows": here})
                    rel["staging_rows"], rel["rows"] = staged, here
                    read = rel.get("rows_read") or 0
                    if read and staged:
                        # What staging measured is the share of the table the statement read (an index
                        # build reads all of it): the same share of this target's rows, or a build that
                        # read all of a small staging table would look like a few look-ups here.
                        rel["staging_rows_read"], rel["rows_read"] = read, int(round(read * float(here) / staged))
                rels.append(rel)
            statements.append(dict(st, relations=rels))
        result = {"version": m.version, "filename": m.filename, "allow_lock": list(m.allow_lock),
                  "impact": statements, "source": "staging"}
        results.append(result)
        # Heavy here or on staging: never rehearsed on this target (from its lock on, the rest of the file).
        staged_sizes = dict(result, impact=[
            dict(st, relations=[dict(rel, rows=rel.get("staging_rows", rel.get("rows")),
                                     rows_read=rel.get("staging_rows_read", rel.get("rows_read")))
                                for rel in st["relations"]])
            for st in statements])
        for i in impacts([result], threshold) + impacts([staged_sizes], threshold):
            key = (m.filename, i["line"])
            heavy.setdefault(key, "staging measured %s%s on %s (%s rows here)" % (
                "%s lock" % i["lock"] if i.get("lock") else "", " and a rewrite" if i.get("rewrite") else "",
                i["table"], rows_here.get(i["table"], "?")))
    return results, heavy, differences


def _differs(a, b):
    if a is None or b is None:
        return False
    lo, hi = sorted((max(int(a), 0), max(int(b), 0)))
    return hi > 10 * max(lo, 1) and hi >= 1000


def rows_of_tables(cur, names):
    """{schema.table: estimated rows} on this target (reltuples; size-based for never-analyzed tables)."""
    names = sorted(set(n for n in names if n))
    if not names:
        return {}
    cur.execute("SELECT n.nspname || '.' || c.relname, c.reltuples::bigint,"
                " CASE WHEN c.reltuples < 0 THEN pg_relation_size(c.oid) END"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname || '.' || c.relname = ANY(%s)", (names,))
    return dict((name, int(t) if t is not None and t >= 0 else int(size or 0) // BYTES_PER_ROW_GUESS)
                for name, t, size in cur.fetchall())


# --------------------------------------------------------------------------- the table

def format_table(results, threshold=None):
    """Per-file impact lines: statement line, relation, strongest lock, rewrite, rows, ms."""
    lines = []
    for r in results or []:
        if r.get("impact") is None:
            continue
        rows = []
        for st in r["impact"]:
            ms = "-" if st.get("ms") is None else str(st["ms"])
            for rel in st.get("relations") or []:
                rows.append("    %5s  %-32s %-24s %-7s %12s %8s%s" % (
                    st["line"], rel["relation"], rel.get("lock") or "-", "yes" if rel.get("rewrite") else "no",
                    ("~%s" % rel["rows"]) if rel.get("rows_guessed") else rel.get("rows", "-"), ms,
                    "  (not observed: documented)" if not st.get("observed", True) else ""))
        source = " (staging's profile)" if r.get("source") == "staging" else (
            "" if r.get("transactional", True) else " (no-transaction file: not observed, documented lock levels)")
        if not rows:
            lines.append("  %s: no lock on a pre-existing table%s" % (r["filename"], source))
            continue
        lines.append("  %s impact%s:" % (r["filename"], source))
        lines.append("     line  relation                         lock                     rewrite         rows       ms")
        lines.extend(rows)
    return lines


# --------------------------------------------------------------------------- squawk

# squawk rules whose warning is about a lock or a rewrite (the others are style and safety).
SQUAWK_LOCK_RULES = frozenset((
    "adding-field-with-default", "adding-foreign-key-constraint", "adding-not-nullable-field",
    "adding-required-field", "adding-serial-primary-key-field", "changing-column-type",
    "constraint-missing-not-valid", "disallowed-unique-constraint", "require-concurrent-index-creation",
    "require-concurrent-index-deletion", "setting-not-nullable-field", "ban-alter-domain-with-add-constraint",
))


def squawk_binary():
    """squawk next to this Python (the project's venv), else on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "squawk")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("squawk")


def squawk_findings(path, transactional, timeout=60):
    """{statement line: [rule, ...]} of squawk's lock rules on a file, or None when squawk is unavailable."""
    binary = squawk_binary()
    if binary is None:
        return None
    cmd = [binary, "--reporter", "json", "--pg-version", "15.0",
           "--assume-in-transaction" if transactional else "--no-assume-in-transaction", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        found = json.loads(proc.stdout or "[]")
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    out = {}
    for f in found if isinstance(found, list) else []:
        if isinstance(f, dict) and f.get("rule_name") in SQUAWK_LOCK_RULES and isinstance(f.get("line"), int):
            out.setdefault(f["line"] + 1, []).append(f["rule_name"])  # squawk's lines are 0-based
    return out


def compare_squawk(results, migrations, threshold):
    """Where squawk's verdict on a statement and the observed profile disagree, both directions."""
    by_file = dict((m.filename, m) for m in migrations)
    out = []
    for r in results or []:
        m = by_file.get(r["filename"])
        if m is None or r.get("impact") is None:
            continue
        found = squawk_findings(m.path, m.transactional)
        if found is None:
            return [{"note": "squawk not found: no comparison with the static lint"}]
        starts = [st.line for st in m.statements]
        rules_at = {}
        for line, rules in found.items():
            start = max([s for s in starts if s <= line] or [starts[0]])
            rules_at.setdefault(start, []).extend(rules)
        for st in r["impact"]:
            rules = sorted(set(rules_at.get(st["line"], [])))
            hit = impacts([{"filename": r["filename"], "version": r["version"], "impact": [st]}], threshold)
            if rules and not hit:
                seen = ", ".join("%s on %s (%s rows)" % (rel.get("lock") or "no lock", rel["relation"], rel.get("rows"))
                                 + (" rewrite" if rel.get("rewrite") else "") for rel in st.get("relations") or [])
                out.append({"file": r["filename"], "line": st["line"], "squawk": rules, "observed_impact": False,
                            "note": "squawk warns (%s), the %s profile shows no impact%s" % (
                                ", ".join(rules), "observed" if st.get("observed", True) else "documented",
                                (": " + seen) if seen else "")})
            elif hit and not rules:
                what = "; ".join("%s%s on %s, %s rows" % (h["lock"] or "", " + rewrite" if h["rewrite"] else "",
                                                          h["table"], h["rows"]) for h in hit)
                out.append({"file": r["filename"], "line": st["line"], "squawk": [], "observed_impact": True,
                            "note": "the %s profile shows an impact (%s), squawk says nothing" % (
                                "observed" if st.get("observed", True) else "documented", what)})
    return out
