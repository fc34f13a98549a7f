# -*- coding: utf-8 -*-
"""The impact profile of a rehearsal (issue 14): what each statement locked, rewrote and read.

The profile's cost is one small query per rehearsal and one per statement, and nothing
else where nothing else is needed (measured: README, Performance):

* as the rehearsal starts, riding on its first SAVEPOINT, one look-up of the relations the
  pending statements name (by the words of their text, bodies and strings included but for
  those no statement runs now: a COMMENT's string, a PL/pgSQL body; not a scan of the catalog,
  which may hold thousands) says what they were before the migrations: oid, name, kind,
  ``relfilenode``, ``reltuples`` and pages; and the catalog's highest oid;
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

The policy that judges a profile lives in ledger_impact_policy.
"""

from __future__ import annotations

import re
import time

# PostgreSQL's table lock modes, weakest first (pg_locks.mode names).
LOCK_MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
              "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
MODE_NAMES = dict((m, re.sub(r"(?<!^)([A-Z])", r" \1", m[:-4]).upper()) for m in LOCK_MODES)
MODE_RANK = dict((name, i) for i, name in enumerate(MODE_NAMES[m] for m in LOCK_MODES))
# A lock stronger than this blocks the application's writes (or reads) for its whole duration.
WEAKEST_STRONG = MODE_RANK["SHARE"]
TABLE_KINDS = ("r", "p", "m")
INDEX_KINDS = ("i", "I")
KINDS = TABLE_KINDS + INDEX_KINDS
KIND_NAMES = {"r": "table", "p": "table", "m": "materialized view", "i": "index", "I": "index"}

# PostgreSQL's FirstNormalObjectId: every object created after initdb has an oid at least this
# (the catalogs and information_schema are below it), so the filter needs no join on pg_namespace.
FIRST_USER_OID = 16384
# The relations the pending statements name, as they are before the migrations (tables,
# materialized views and indexes; not TOAST's, not temporary ones), and the highest oid in the
# catalog. Only named ones: a catalog of thousands of relations would otherwise cost more than the
# rehearsal. Plain columns: the schema through regnamespace's output (a cache look-up, no join to
# plan), the size from relpages (no file is opened). The LEFT JOIN keeps the one row of the highest
# oid when nothing named exists. The words travel as one array literal (``name_array``): a
# parameter of hundreds of separately quoted strings costs more to send and parse than the look-up.
_COLUMNS = ("c.oid, c.relnamespace::regnamespace::text, c.relname, c.relkind, c.relfilenode, c.reltuples::bigint,"
            " c.relpages::bigint * current_setting('block_size')::bigint")
_USER = ("c.oid >= %d AND c.relkind IN ('r', 'p', 'm', 'i', 'I') AND c.relpersistence <> 't'"
         " AND c.relnamespace <> 'pg_toast'::regnamespace" % FIRST_USER_OID)
_TOP = "SELECT m.top, r.* FROM (SELECT max(oid) AS top FROM pg_catalog.pg_class) m LEFT JOIN (%s) r ON true"
# The look-up is by name alone: which of the few relations found are user tables and indexes
# (``_is_user``) is decided here, which costs less than planning the filter (measured).
_SNAPSHOT_COLUMNS = _COLUMNS + ", c.relpersistence"
# A few words: one index scan for them all (measured: half the time of a probe per word).
SNAPSHOT_FEW_SQL = _TOP % ("SELECT " + _SNAPSHOT_COLUMNS + " FROM pg_catalog.pg_class c WHERE c.relname = ANY(%s::name[])")
# Many words (a set's function bodies): one index probe per word. OFFSET 0 keeps the planner from
# turning an '= ANY' of hundreds of names into a scan of all pg_class, which in a catalog of
# thousands of relations costs more than the rehearsal.
SNAPSHOT_MANY_SQL = _TOP % ("SELECT " + _SNAPSHOT_COLUMNS + " FROM pg_catalog.unnest(%s::name[]) w (name), LATERAL"
                            " (SELECT * FROM pg_catalog.pg_class c WHERE c.relname = w.name OFFSET 0) c")
FEW_WORDS = 16
# The one query per statement: this backend's granted locks on relations that may be
# pre-existing (the oids above the catalog's highest are the migrations' own, unless the oid
# counter wrapped: then the look-up after the rollback finds them gone) with each one's
# filenode, and the rows this transaction read from it (pg_stat_xact_*: tuples returned by scans
# and fetched through indexes): a statement that reads a table under a strong lock holds it for that work.
# pg_lock_status() is what the pg_locks view selects from; called directly it plans in less time.
# The kind tells an index no statement names, which matters only if rewritten (then it holds
# ACCESS EXCLUSIVE): the others (an FK's referenced key, read under ACCESS SHARE) need no look-up.
LOCKS_SQL = (
    "SELECT l.relation::bigint, l.mode, pg_catalog.pg_relation_filenode(l.relation),"
    " pg_catalog.pg_stat_get_xact_tuples_returned(l.relation) + pg_catalog.pg_stat_get_xact_tuples_fetched(l.relation),"
    " (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = l.relation)"
    " FROM pg_catalog.pg_lock_status() l WHERE l.pid = pg_catalog.pg_backend_pid() AND l.locktype = 'relation'"
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
PLPGSQL = re.compile(r"\bLANGUAGE\s+plpgsql\b", re.I)
# Statements of these kinds (and ALTER, but for ALTER TYPE/DOMAIN) lock only the objects they name: when they name no pre-existing
# relation (not even in a function body or a string), pg_locks is not read after them. The
# read costs ~1 ms once a big set has created hundreds of objects (pg_lock_status() copies
# every lock), so a set of many CREATEs would otherwise pay far more than 1.2x.
NAMED_ONLY = frozenset(("create", "comment", "grant", "revoke"))
# Matched on the lower-cased text (unquoted names fold to lower case).
WORDS = re.compile(r"[a-z_][a-z0-9_$]*")
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
    its dynamic SQL names. Two texts are never run by their statement, so only what surrounds
    them counts: a COMMENT's string, and a PL/pgSQL body (its creation checks the syntax alone;
    what it locks when a later statement runs it is read after the rollback, as any relation no
    statement names).
    """
    text = stmt.masked if _runs_no_text(stmt) else stmt.text
    words = set(WORDS.findall(text.lower()))
    if '"' in text:
        words.update(q.replace('""', '"') for q in QUOTED.findall(text))
    return words


def _runs_no_text(stmt):
    """A COMMENT, or a CREATE FUNCTION/PROCEDURE in LANGUAGE plpgsql: its strings and body are not run now."""
    head = stmt.masked[:80].lower().split(None, 4)
    if head[:1] == ["comment"]:
        return True
    if head[:2] == ["create", "or"]:
        head = head[:1] + head[3:]  # CREATE OR REPLACE
    return head[:2] in (["create", "function"], ["create", "procedure"]) and bool(PLPGSQL.search(stmt.masked))


def name_array(words):
    """A PostgreSQL array literal of ``words`` (any characters: each element double-quoted, escaped)."""
    if not words:
        return "{}"
    # Joined on NUL, which no migration file holds (ledger_migration_set refuses control characters),
    # so the escaping is two replacements of one string, not two per word.
    text = "\0".join(words)
    if '"' in text or "\\" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '{"%s"}' % text.replace("\0", '","')


def snapshot(cur, statements, run_first=None):
    """({oid: Relation} of the user relations named, as the rehearsal starts; the catalog's highest oid).

    ``statements``: each statement's words (``statement_words``).
    ``run_first``: a statement sent in the same round trip, before the snapshot (the first SAVEPOINT).
    """
    words = set()
    for stmt_words in statements:
        words.update(stmt_words)
    sql = SNAPSHOT_FEW_SQL if len(words) <= FEW_WORDS else SNAPSHOT_MANY_SQL
    cur.execute(sql if run_first is None else run_first + ";\n" + sql, (name_array(words),))
    rows = cur.fetchall()
    return dict((row[1], Relation(row[1:8])) for row in rows if _is_user(row[1:])), rows[0][0] if rows else None


def _is_user(row):
    """A snapshot row (``_SNAPSHOT_COLUMNS``) of a user table, materialized view or index: as ``_USER`` says in SQL."""
    oid, schema, _name, kind, _node, _rows, _size, persistence = row
    return oid is not None and oid >= FIRST_USER_OID and kind in KINDS and persistence != "t" and schema != "pg_toast"


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
        self.kinds = {}  # oid -> relkind, of the last pg_locks read

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
        held, nodes, reads, self.kinds = set(), {}, {}, {}
        for oid, mode, filenode, read, kind in cur.fetchall():
            held.add((oid, mode))
            nodes[oid] = filenode
            reads[oid] = int(read or 0)
            self.kinds[oid] = kind
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
                if (self.kinds.get(oid) in INDEX_KINDS and oid not in self.unnamed
                        and MODE_NAMES["AccessExclusiveLock"] not in modes):
                    # An index no statement names, not rewritten so far (that takes ACCESS
                    # EXCLUSIVE): shown only once rewritten, so not looked up.
                    continue
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
