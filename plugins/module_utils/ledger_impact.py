# -*- coding: utf-8 -*-
"""The impact profile of a rehearsal and the lock policy (issue 14).

The profile's cost is one small query per rehearsal and one per statement, and nothing
else where nothing else is needed (measured: README, Performance):

* as the rehearsal starts, riding on its first SAVEPOINT, one look-up of the relations the
  pending statements name (one index probe per word of their text, bodies included; not a scan
  of the catalog, which may hold thousands) says what they were before the migrations: oid,
  name, kind, ``relfilenode``, ``reltuples`` and pages; and the catalog's highest oid;
* after each statement, sent with it (one round trip), one read of ``pg_locks`` for this
  backend says which relations up to that oid it newly locked and in which mode, each one's
  filenode now (a rewrite changed it) and the rows this transaction has read from it;
* only when the profile shows a relation no statement names (a partition rewritten through its
  parent, an index rewritten with its table, a table a trigger writes), a never-ANALYZEd table
  (its rows are guessed from its size) or an index (its table), one query after the
  rehearsal's rollback reads those few: the committed catalog then is again what it was before
  the rehearsal (so a relation gone with the rollback was the migrations' own).

Files that run outside a transaction are profiled from PostgreSQL's documented lock
levels ("not observed"): their rehearsal form would take other locks than the real
run (a plain CREATE INDEX instead of CONCURRENTLY).

The policy: a lock stronger than SHARE UPDATE EXCLUSIVE on a pre-existing table
with more than ``threshold`` estimated rows, or a rewrite of such a table, is an
*impact*; ``-- ledger:allow-lock schema.table`` in a file's header declares it
intended. squawk's verdict on the same statements is compared with what was
observed (``compare_squawk``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

# PostgreSQL's table lock modes, weakest first (pg_locks.mode names).
LOCK_MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
              "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
MODE_NAMES = dict((m, re.sub(r"(?<!^)([A-Z])", r" \1", m[:-4]).upper()) for m in LOCK_MODES)
MODE_RANK = dict((name, i) for i, name in enumerate(MODE_NAMES[m] for m in LOCK_MODES))
# A lock stronger than this blocks the application's writes (or reads) for its whole duration.
WEAKEST_STRONG = MODE_RANK["SHARE"]
TABLE_KINDS = ("r", "p", "m")
KIND_NAMES = {"r": "table", "p": "table", "m": "materialized view", "i": "index", "I": "index"}

# PostgreSQL's FirstNormalObjectId: every object created after initdb has an oid at least this
# (the catalogs and information_schema are below it), so the filter needs no join on pg_namespace.
FIRST_USER_OID = 16384
# The relations the pending statements name, as they are before the migrations (tables,
# materialized views and indexes; not TOAST's, not temporary ones), and the highest oid in the
# catalog. Only named ones: a catalog of thousands of relations would otherwise cost more than the
# rehearsal. One index probe per word (OFFSET 0 keeps the planner from turning it into a scan
# of all pg_class: an '= ANY' filter or a hash join costs as much as the whole catalog). Plain columns: the schema through regnamespace's output
# (a cache look-up, no join to plan), the size from relpages (no file is opened). The LEFT JOIN
# keeps the one row of the highest oid when nothing named exists.
_COLUMNS = ("c.oid, c.relnamespace::regnamespace::text, c.relname, c.relkind, c.relfilenode, c.reltuples::bigint,"
            " c.relpages::bigint * current_setting('block_size')::bigint")
_USER = ("c.oid >= %d AND c.relkind IN ('r', 'p', 'm', 'i', 'I') AND c.relpersistence <> 't'"
         " AND c.relnamespace <> 'pg_toast'::regnamespace" % FIRST_USER_OID)
SNAPSHOT_SQL = ("SELECT m.top, r.* FROM (SELECT max(oid) AS top FROM pg_catalog.pg_class) m LEFT JOIN"
                " (SELECT " + _COLUMNS + " FROM pg_catalog.unnest(%s::name[]) w (name), LATERAL"
                " (SELECT * FROM pg_catalog.pg_class c WHERE c.relname = w.name AND " + _USER + " OFFSET 0) c) r ON true")
# The one query per statement: this backend's granted locks on relations that may be
# pre-existing (the oids above the catalog's highest are the migrations' own, unless the oid
# counter wrapped: then the look-up after the rollback finds them gone) with each one's
# filenode, and the rows this transaction read from it (pg_stat_xact_*: tuples returned by scans
# and fetched through indexes): a statement that reads a table under a strong lock holds it for that work.
LOCKS_SQL = (
    "SELECT l.relation::bigint, l.mode, pg_catalog.pg_relation_filenode(l.relation),"
    " pg_catalog.pg_stat_get_xact_tuples_returned(l.relation) + pg_catalog.pg_stat_get_xact_tuples_fetched(l.relation)"
    " FROM pg_catalog.pg_locks l WHERE l.pid = pg_catalog.pg_backend_pid() AND l.locktype = 'relation'"
    " AND l.granted AND l.relation BETWEEN %d AND %%d" % FIRST_USER_OID)
# After the rollback (the committed catalog is again what it was before the rehearsal), for the
# few relations of the profile that need it: one no statement names (a partition rewritten
# through its parent, an index rewritten with its table, a table a trigger writes), an index's
# table, the size of a never-ANALYZEd table (its rows are guessed from it).
DETAILS_SQL = (
    "SELECT " + _COLUMNS + ", i.indrelid, pg_catalog.pg_relation_size(c.oid)"
    " FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid"
    " WHERE c.oid = ANY(%s) AND " + _USER)
QUOTED = re.compile(r'"((?:[^"]|"")+)"')
# Statements of these kinds (and ALTER, but for ALTER TYPE/DOMAIN) lock only the objects they name: when they name no pre-existing
# relation (not even in a function body or a string), pg_locks is not read after them. The
# read costs ~1 ms once a big set has created hundreds of objects (pg_lock_status() copies
# every lock), so a set of many CREATEs would otherwise pay far more than 1.2x.
NAMED_ONLY = frozenset(("create", "comment", "grant", "revoke"))
WORDS = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
# Tuples per byte when a table was never ANALYZEd (reltuples = -1): a rough 100 bytes a row, so
# a big table that was never analyzed still counts as big.
BYTES_PER_ROW_GUESS = 100


def mode_name(mode):
    return MODE_NAMES.get(mode, mode)


def stronger(a, b):
    """The stronger of two lock names (either may be None)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if MODE_RANK.get(a, -1) >= MODE_RANK.get(b, -1) else b


def is_strong(lock):
    return lock is not None and MODE_RANK.get(lock, -1) >= WEAKEST_STRONG


def unquote_ident(text):
    """An identifier as regnamespace prints it (quoted only where needed) back to its name."""
    if len(text) > 1 and text[0] == '"' and text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


class Relation(object):
    """A relation as it was before the rehearsal (the snapshot's row).

    Two facts are left unknown until the profile needs them (``Profiler.finish``): an index's
    table, and the size of a table never ANALYZEd (``reltuples`` -1), of which ``rows`` is a guess.
    """
    __slots__ = ("oid", "schema", "name", "kind", "filenode", "rows", "size_bytes", "table_oid", "rows_guessed")

    def __init__(self, row):
        (self.oid, schema, self.name, self.kind, filenode, reltuples, self.size_bytes) = row
        self.schema = unquote_ident(schema)
        self.filenode = filenode or None  # 0: a partitioned table (no storage), as pg_relation_filenode's NULL
        self.table_oid = None
        self.rows_guessed = reltuples is None or reltuples < 0
        self.rows = None if self.rows_guessed else int(reltuples)
        if self.rows_guessed:
            self.size_bytes = None

    @property
    def is_index(self):
        return self.kind not in TABLE_KINDS

    @property
    def known(self):
        return self.rows is not None and not (self.is_index and self.table_oid is None)

    def learn(self, table_oid, size):
        """What the look-up after the rollback found (``table_oid`` 0 and ``size`` 0: gone meanwhile)."""
        if self.is_index:
            self.table_oid = table_oid or 0
        if self.rows is None:
            self.size_bytes = int(size or 0)
            self.rows = self.size_bytes // BYTES_PER_ROW_GUESS

    @property
    def qualified(self):
        return "%s.%s" % (self.schema, self.name)


def statement_words(stmt):
    """The words of a statement that may name a relation: folded (as PostgreSQL folds unquoted names) and quoted ones.

    The whole text, function bodies and strings included: a statement can lock what its body or
    its dynamic SQL names.
    """
    words = set(WORDS.findall(stmt.text.lower()))
    if '"' in stmt.text:
        words.update(q.replace('""', '"') for q in QUOTED.findall(stmt.text))
    return words


def snapshot(cur, statements, run_first=None):
    """({oid: Relation} of the user relations named, as the rehearsal starts; the catalog's highest oid).

    ``statements``: each statement's words (``statement_words``).
    ``run_first``: a statement sent in the same round trip, before the snapshot (the first SAVEPOINT).
    """
    words = set()
    for stmt_words in statements:
        words.update(stmt_words)
    cur.execute(SNAPSHOT_SQL if run_first is None else run_first + ";\n" + SNAPSHOT_SQL, (sorted(words),))
    rows = cur.fetchall()
    return dict((row[1], Relation(row[1:])) for row in rows if row[1] is not None), rows[0][0] if rows else None


class Profiler(object):
    """Per-statement observation inside the rehearsal transaction (one pg_locks query per statement)."""

    def __init__(self):
        self.before = {}
        self.by_name = {}
        self.names = set()
        self.held = set()
        self.filenodes = {}
        self.reads = {}
        self.locks_sql = None
        self.incomplete = []  # [(relation entry, Relation)] to finish after the rollback
        self.unnamed = {}  # oid -> [(entry, new modes, rows read, filenode after)]: resolved after the rollback
        self.words = {}  # id(statement) -> its words (statement_words)

    def start(self, cur, statements, run_first=None):
        """Read what the ``statements`` (all the rehearsal's) name, as it is before them."""
        self.words = dict((id(stmt), statement_words(stmt)) for stmt in statements)
        self.before, top = snapshot(cur, self.words.values(), run_first)
        self.by_name = dict((r.qualified, r) for r in self.before.values())
        self.names = set(r.name for r in self.before.values())
        self.names.update(n.lower() for n in list(self.names))
        self.filenodes = dict((oid, r.filenode) for oid, r in self.before.items())
        # Only what existed before can be an impact: the relations the migrations create hold
        # locks too (hundreds in a big set), and reading them back at every statement would cost
        # more than the rehearsal. Their oids are above the catalog's highest as the rehearsal starts.
        self.locks_sql = LOCKS_SQL % top if top is not None and top >= FIRST_USER_OID else None
        # The rehearsal's transaction has just begun: it holds no lock on a user relation yet and
        # has read none of their rows, so there is nothing more to ask before the first statement.
        self.held, self.reads, self.incomplete, self.unnamed = set(), {}, [], {}

    def _locks(self, cur, run_first=None):
        if self.locks_sql is None:  # nothing pre-existing (a fresh database): nothing to observe
            if run_first is not None:
                cur.execute(run_first)
            return set(), {}, {}
        # The statement and the observation in one round trip (simple query protocol, inside the
        # rehearsal's transaction): the profile then costs one small query, not one more exchange.
        cur.execute(self.locks_sql if run_first is None else run_first + "\n;\n" + self.locks_sql)
        held, nodes, reads = set(), {}, {}
        for oid, mode, filenode, read in cur.fetchall():
            held.add((oid, mode))
            nodes[oid] = filenode
            reads[oid] = int(read or 0)
        return held, nodes, reads

    def names_nothing_old(self, stmt):
        """Whether a statement can only lock what it creates (a CREATE/COMMENT/GRANT naming no old relation)."""
        words = [w.lower() for w in stmt.masked.split(None, 2)[:2]]  # the first two keywords, without splitting it all
        alter = bool(words) and words[0] == "alter" and len(words) > 1 and words[1] not in ("type", "domain")
        if not words or not (words[0] in NAMED_ONLY or alter):
            # ALTER TYPE / DOMAIN may scan every table using them, without naming one.
            return False
        words = self.words.get(id(stmt))
        return self.names.isdisjoint(words if words is not None else statement_words(stmt))

    def execute(self, cur, stmt, text):
        """Run a statement's rehearsal form and return its profile entry (observed)."""
        t = time.monotonic()
        if self.locks_sql is None or self.names_nothing_old(stmt):
            cur.execute(text)
            return {"line": stmt.line, "statement": stmt.summary(100), "ms": int(round((time.monotonic() - t) * 1000)),
                    "observed": True, "relations": []}
        observed = self._locks(cur, text)
        return self._entry(stmt, int(round((time.monotonic() - t) * 1000)), *observed)

    def catch_up(self, cur):
        """Take in the locks a no-transaction file's rehearsal form took (its entries are the documented ones)."""
        if self.locks_sql is not None:
            self._entry(None, None, *self._locks(cur))

    def _entry(self, stmt, ms, held, nodes, reads):
        new = held - self.held
        self.held = held
        per_rel = {}
        for oid, mode in new:
            per_rel.setdefault(oid, set()).add(mode_name(mode))
        read_now = {}
        for oid, n in reads.items():
            if n > self.reads.get(oid, 0):
                read_now[oid] = n - self.reads.get(oid, 0)
                per_rel.setdefault(oid, set())
        self.reads.update(reads)
        rewritten = set()
        for oid, node in nodes.items():
            if node is not None and node != self.filenodes.get(oid):
                self.filenodes[oid] = node
                per_rel.setdefault(oid, set())
                if oid in self.before:
                    rewritten.add(oid)
        entry = {"line": stmt.line, "statement": stmt.summary(100), "ms": ms, "observed": True,
                 "relations": []} if stmt is not None else None  # None: caught up, not shown
        for oid, modes in per_rel.items():
            rel = self.before.get(oid)
            if rel is None:
                # No statement names it (a partition, an index, a table a trigger writes), or the
                # migrations created it after an oid wrap-around: known after the rollback.
                self.unnamed.setdefault(oid, []).append((entry, modes, read_now.get(oid, 0), nodes.get(oid)))
            elif entry is not None and (not rel.is_index or oid in rewritten):
                # An index's lock and rewrite are shown; its table's size is what the policy weighs.
                entry["relations"].append(self._observed(rel, modes, oid in rewritten, read_now.get(oid, 0)))
        if entry is not None:
            _sort(entry)
        return entry

    def _observed(self, rel, modes, rewrite, rows_read):
        lock = None
        for m in modes:
            lock = stronger(lock, m)
        if rewrite:
            # Every rewrite holds ACCESS EXCLUSIVE on what it rewrites; a rehearsal's earlier
            # statement may already hold it (then it is not new to this one).
            lock = "ACCESS EXCLUSIVE"
        return self._relation(rel, {"relation": rel.qualified, "kind": KIND_NAMES.get(rel.kind, rel.kind),
                                    "table": rel.qualified, "lock": lock, "rewrite": rewrite, "rows_read": rows_read})

    def _relation(self, rel, entry):
        """Complete a relation entry with its table's name and size, now or (when unknown yet) after the rollback."""
        _table_fields(entry, rel, self.before)
        table = self.before.get(rel.table_oid) if rel.is_index else rel
        if not rel.known or (table is not None and not table.known):
            self.incomplete.append((entry, rel))
        return entry

    def documented(self, stmt):
        """The profile entry of a statement of a no-transaction file, from PostgreSQL's documentation."""
        entry = documented_profile(stmt, self.by_name)
        for rel_entry in entry["relations"]:
            rel = self.by_name.get(rel_entry["relation"])
            if rel is not None:
                self._relation(rel, rel_entry)
        return entry

    def _details(self, cur, oids):
        """Read relations as committed (after the rollback): new ones join ``before``; known ones learn what they lacked."""
        cur.execute(DETAILS_SQL, (sorted(oids),))
        found = set()
        for row in cur.fetchall():
            oid, table_oid, size = row[0], row[7], row[8]
            found.add(oid)
            rel = self.before.get(oid)
            if rel is None:
                rel = self.before[oid] = Relation(row[:7])
                self.filenodes.setdefault(oid, rel.filenode)
            rel.learn(table_oid, size)
        return found

    def finish(self, cur):
        """After the rollback: the relations no statement named, index tables and never-ANALYZEd sizes (if any)."""
        if self.unnamed:
            found = self._details(cur, self.unnamed)
            for oid, seen in sorted(self.unnamed.items()):
                if oid not in found:  # created by the migrations (gone with the rollback), or not a user relation
                    continue
                rel, node_before = self.before[oid], self.before[oid].filenode
                for entry, modes, rows_read, node in seen:
                    rewrite = node is not None and node != node_before
                    node_before = node if node is not None else node_before
                    if entry is not None and (not rel.is_index or rewrite):
                        entry["relations"].append(self._observed(rel, modes, rewrite, rows_read))
                        _sort(entry)
            self.unnamed = {}
        for _round in range(2):  # the relations, then the tables of indexes that were not read yet
            ask = set()
            for _entry, rel in self.incomplete:
                if not rel.known:
                    ask.add(rel.oid)
                table = self.before.get(rel.table_oid)
                if rel.is_index and rel.table_oid and (table is None or not table.known):
                    ask.add(rel.table_oid)
            if not ask:
                break
            found = self._details(cur, ask)
            for oid in ask - found:  # dropped by another session meanwhile: no table, no size
                if oid in self.before:
                    self.before[oid].learn(0, 0)
        for entry, rel in self.incomplete:
            _table_fields(entry, rel, self.before)
        self.incomplete = []


def _sort(entry):
    entry["relations"].sort(key=lambda r: (-MODE_RANK.get(r["lock"] or "", -1), r["relation"]))


def _table_fields(entry, rel, before):
    """The table an entry weighs (an index's table) with its estimated rows and size."""
    table = before.get(rel.table_oid) if rel.is_index else rel
    rows_of = table or rel
    entry.update({"table": table.qualified if table else entry.get("table", rel.qualified), "rows": rows_of.rows,
                  "rows_guessed": rows_of.rows_guessed, "size_bytes": rows_of.size_bytes})
    return entry


# --------------------------------------------------------------------------- documented lock levels

_IDENT = r'(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)'
_QNAME = r"(%s(?:\s*\.\s*%s)?)" % (_IDENT, _IDENT)
# (pattern on the masked statement, lock on the named table, rewrite, the documentation's words)
DOCUMENTED = (
    (re.compile(r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\b.*?\bON\s+(?:ONLY\s+)?" + _QNAME, re.I | re.S),
     "SHARE UPDATE EXCLUSIVE", False, "CREATE INDEX CONCURRENTLY"),
    (re.compile(r"^\s*REINDEX\b.*\bCONCURRENTLY\s+" + _QNAME, re.I | re.S),
     "SHARE UPDATE EXCLUSIVE", False, "REINDEX CONCURRENTLY"),
    (re.compile(r"^\s*DROP\s+INDEX\s+CONCURRENTLY\s+(?:IF\s+EXISTS\s+)?" + _QNAME, re.I | re.S),
     "SHARE UPDATE EXCLUSIVE", False, "DROP INDEX CONCURRENTLY"),
    (re.compile(r"^\s*ALTER\s+TABLE\s+(?:ONLY\s+)?" + _QNAME + r"\s+DETACH\s+PARTITION\b.*\bCONCURRENTLY", re.I | re.S),
     "SHARE UPDATE EXCLUSIVE", False, "DETACH PARTITION CONCURRENTLY"),
    (re.compile(r"^\s*VACUUM\s*(?:\([^)]*\bFULL\b[^)]*\)|FULL\b)\s*(?:\w+\s+)*?" + _QNAME, re.I | re.S),
     "ACCESS EXCLUSIVE", True, "VACUUM FULL"),
    (re.compile(r"^\s*VACUUM\b(?:\s*\([^)]*\))?(?:\s+(?:VERBOSE|ANALYZE|FREEZE))*\s+" + _QNAME, re.I | re.S),
     "SHARE UPDATE EXCLUSIVE", False, "VACUUM"),
)


def _unquote(qname):
    parts = [p.strip().strip('"') for p in qname.split(".")]
    return ".".join(parts) if len(parts) == 2 else "public." + parts[0]


def documented_profile(stmt, by_name):
    """What PostgreSQL documents for a statement run outside a transaction ("not observed")."""
    entry = {"line": stmt.line, "statement": stmt.summary(100), "ms": None, "observed": False, "relations": []}
    for pattern, lock, rewrite, what in DOCUMENTED:
        m = pattern.match(stmt.masked)
        if not m:
            continue
        name = _unquote(m.group(1))
        rel = by_name.get(name)
        # An index's table: filled in by the Profiler (it may need a look-up after the rollback).
        table = rel if rel is not None and not rel.is_index else None
        entry["relations"].append({
            "relation": name, "kind": KIND_NAMES.get(rel.kind, "table") if rel else "table",
            "table": table.qualified if table else name, "lock": lock, "rewrite": rewrite,
            "rows": table.rows if table else None, "rows_guessed": table.rows_guessed if table else False,
            "size_bytes": table.size_bytes if table else None, "documented": what})
        entry["note"] = "not observed: %s, by PostgreSQL's documented lock level" % what
        return entry
    entry["note"] = "not observed: no documented lock level known for this statement"
    return entry


# --------------------------------------------------------------------------- the policy

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
