# -*- coding: utf-8 -*-
"""The migration engine: history, checksums, lease, timeouts, rehearsal and honest failure.

Public API (stable: the precheck and rollback roles call it; keep names and signatures):

    load_migration_set(directory)                       -> MigrationSet (a list of Migration)
    split_sql(text)                                     -> list of Statement
    inspect(conn_or_url, migrations, target=None, allow_out_of_order=False) -> dict
    plan_problems(info)                                 -> list of str (drift, order, target)
    rehearse(url, pending, **settings)                  -> list of per-file result dicts
    apply(url, migrations, **settings)                  -> result dict (raises LedgerError on failure)
    revert(url, migrations, to_version, **settings)     -> result dict (raises LedgerError on failure)
    baseline(url, migrations, version, **settings)      -> result dict
    accept_checksum(url, migrations, version, **settings) -> result dict
    status(url, migrations, target=None, ...)           -> dict (read-only)
    nontx_route_problem(url, pending, direct_url=None)  -> LedgerError or None (read-only)
    connection_route(conn, url)                         -> dict: client_port, server_port, pooled
    format_rehearsal(results)                           -> list of str

Every failure is a LedgerError whose ``fields`` carry the structured result
(target, file, line, sqlstate, message, hint, next_command, ...). Nothing here
prints or raises a bare traceback for a PostgreSQL error; no message carries a
password (URLs are shown through describe_target()).

Design (see roles/migrate/README.md for the operator's view):

* One transaction per migration: ``SET LOCAL`` timeouts, ``SELECT ... FOR UPDATE``
  of the lease row, the file's statements, its ``migrations.history`` row, its
  ``migrations.events`` row and the lease renewal commit together or not at all.
* Mutual exclusion without session state (PgBouncer transaction pooling): a lease
  row ``migrations.lock`` (id = 1) holding run id, holder and expiry; ownership is
  a token unique to each Lease object (every host of one playbook run shares the
  run id). It is taken in a short transaction when absent or expired, renewed by a
  heartbeat thread and at the end of every migration transaction, row-locked
  inside every migration transaction (so a lease that expired during a long
  migration can't be stolen while that migration runs; a no-transaction file has
  no transaction to hold it and relies on the heartbeat), and deleted at the end.
  Waiters poll with ``FOR UPDATE NOWAIT`` and sleep outside any transaction: a
  waiter never holds a snapshot, so it can never block a ``CREATE INDEX
  CONCURRENTLY`` of the holder.
* Session state: transactional files may only SET LOCAL (plain SET/RESET is
  refused when the set is read); no-transaction files run on a connection of
  their own (direct_url when set; refused through a detected pooler), reset and
  closed after the file.
* A killed runner: its transaction dies with its connection (the server notices
  promptly through ``client_connection_check_interval``), and its lease expires
  after ``lock_ttl`` seconds (the next run waits for the expiry and reports the
  dead holder and its age).
* Rehearsal: all pending files, in order, inside ONE transaction that is rolled
  back, one savepoint per file; nothing is written (not even the records schema).
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid

from ansible.module_utils.ledger_common import (
    LedgerError,
    actor,
    connect,
    describe_target,
    ensure_records,
    log_event,
    log_event_autonomous,
    new_run_id,
    parse_url,
    pg_error,
    redact,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - connect() reports it
    psycopg2 = None

VERSION_RE = re.compile(r"^[0-9]{4}$")
UP_RE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[A-Za-z0-9][A-Za-z0-9_]*)\.sql$")
DOWN_RE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[A-Za-z0-9][A-Za-z0-9_]*)\.down\.sql$")
DIRECTIVE_RE = re.compile(r"^--\s*ledger:(?P<name>[A-Za-z0-9_-]*)")
KNOWN_DIRECTIVES = ("no-transaction",)
NO_TRANSACTION = "no-transaction"

# SQLSTATEs retried with back-off: lock_not_available (lock_timeout, NOWAIT) and
# deadlock_detected (a migration that met application traffic the other way round).
RETRIABLE = ("55P03", "40P01")

# Default lock_wait = lock_ttl + this: a run started right after a runner was SIGKILLed
# waits for the dead run's lease to expire (at most lock_ttl) and takes it over.
LOCK_WAIT_MARGIN = 30.0

DEFAULTS = {
    "lock_timeout": "2s",
    "statement_timeout": "0",
    "lock_retries": 3,
    "retry_backoff": 0.5,
    "retry_backoff_max": 30.0,
    "lock_wait": None,  # lock_ttl + LOCK_WAIT_MARGIN: a re-run right after a killed run outwaits its lease
    "lock_ttl": 60.0,
    "connection_check": "1s",
}


# =========================================================================== SQL splitting

class SqlSyntaxError(ValueError):
    """Unterminated quote or comment: raised with the 1-based line where it starts."""

    def __init__(self, msg, line):
        super(SqlSyntaxError, self).__init__(msg)
        self.line = line


class Statement(object):
    """One SQL statement of a file.

    text:    the statement as sent to the server (leading comments and the
             terminating semicolon excluded; inner comments kept);
    line:    1-based line of the file where ``text`` starts;
    offset:  0-based character offset of ``text`` in the file;
    masked:  ``text`` with comments, string literals and dollar-quoted bodies
             blanked (same length), for keyword checks that must ignore them;
    dollar_lines: file lines where each dollar-quoted body of the statement opens.
    """

    __slots__ = ("text", "line", "offset", "masked", "dollar_lines")

    def __init__(self, text, line, offset, masked, dollar_lines):
        self.text = text
        self.line = line
        self.offset = offset
        self.masked = masked
        self.dollar_lines = dollar_lines

    def line_at(self, position):
        """File line of a 1-based character position inside ``text`` (diag.statement_position)."""
        if not position or position < 1:
            return self.line
        return self.line + self.text[:position - 1].count("\n")

    @property
    def keywords(self):
        return self.masked.split()[:6]

    def summary(self, width=160):
        one = " ".join(self.text.split())
        return one if len(one) <= width else one[:width - 3] + "..."

    def __repr__(self):
        return "Statement(line=%d, %r)" % (self.line, self.summary(40))


_IDENT_START = re.compile(r"[A-Za-z_\u0080-\uffff]")
_WORD = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")
_WS = re.compile(r"\s+")


def _scan(text):
    """Yield (kind, start, end) tokens: ws, comment, string, ident, dollar, word, semi, other."""
    i = 0
    n = len(text)
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(pos):
        return bisect.bisect_right(newlines, pos - 1) + 1

    while i < n:
        c = text[i]
        if c.isspace():
            m = _WS.match(text, i)
            yield ("ws", i, m.end())
            i = m.end()
        elif c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            yield ("comment", i, j)
            i = j
        elif c == "/" and text.startswith("/*", i):
            depth = 0
            j = i
            while j < n:
                if text.startswith("/*", j):
                    depth += 1
                    j += 2
                elif text.startswith("*/", j):
                    depth -= 1
                    j += 2
                    if depth == 0:
                        break
                else:
                    j += 1
            if depth:
                raise SqlSyntaxError("unterminated /* comment", line_of(i))
            yield ("comment", i, j)
            i = j
        elif c == "'":
            j = _end_of_string(text, i + 1, escapes=False)
            if j < 0:
                raise SqlSyntaxError("unterminated quoted string", line_of(i))
            yield ("string", i, j)
            i = j
        elif c == '"':
            j = i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise SqlSyntaxError('unterminated quoted identifier', line_of(i))
                if text.startswith('""', k):
                    j = k + 2
                    continue
                j = k + 1
                break
            yield ("ident", i, j)
            i = j
        elif c == "$":
            m = _DOLLAR_TAG.match(text, i)
            if m:
                tag = m.group(0)
                k = text.find(tag, m.end())
                if k < 0:
                    raise SqlSyntaxError("unterminated dollar-quoted string %s" % tag, line_of(i))
                yield ("dollar", i, k + len(tag))
                i = k + len(tag)
            else:  # $1: a parameter
                m = re.compile(r"\$[0-9]*").match(text, i)
                yield ("other", i, m.end())
                i = m.end()
        elif c == ";":
            yield ("semi", i, i + 1)
            i += 1
        elif _IDENT_START.match(c):
            m = _WORD.match(text, i)
            word = m.group(0)
            j = m.end()
            if word in ("E", "e") and j < n and text[j] == "'":
                k = _end_of_string(text, j + 1, escapes=True)
                if k < 0:
                    raise SqlSyntaxError("unterminated E'' string", line_of(i))
                yield ("string", i, k)
                i = k
            else:
                yield ("word", i, j)
                i = j
        elif c.isdigit():
            m = _NUMBER.match(text, i)
            yield ("other", i, m.end())
            i = m.end()
        else:
            yield ("other", i, i + 1)
            i += 1


def _end_of_string(text, j, escapes):
    """Index just past the closing quote of a '' string whose body starts at j, or -1."""
    n = len(text)
    while j < n:
        c = text[j]
        if escapes and c == "\\":
            j += 2
            continue
        if c == "'":
            if j + 1 < n and text[j + 1] == "'":
                j += 2
                continue
            return j + 1
        j += 1
    return -1


def split_sql(text):
    """Split SQL text into statements, each with the file line where it starts.

    Understands ``--`` and nested ``/* */`` comments, ``'...'`` strings (with ``''``),
    ``E'...'`` strings (with backslash escapes), ``"identifiers"``, ``$tag$`` dollar
    quotes, and ``BEGIN ATOMIC ... END`` bodies of SQL-standard functions (as psql
    does). Raises SqlSyntaxError (with ``.line``) on an unterminated quote or comment.
    """
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(pos):
        return bisect.bisect_right(newlines, pos - 1) + 1

    statements = []
    start = None
    end = None
    masked = []
    words = []
    dollars = []
    begin_depth = 0

    def flush():
        if start is None:
            return
        body = text[start:end]
        statements.append(Statement(body, line_of(start), start, "".join(masked)[: end - start], dollars[:]))

    for kind, s, e in _scan(text):
        if kind == "semi" and begin_depth == 0:
            flush()
            start, end, masked, words, dollars, begin_depth = None, None, [], [], [], 0
            continue
        if start is None:
            if kind in ("ws", "comment"):
                continue
            start = s
        # Masked copy keeps the layout (same length) but blanks what keywords must ignore.
        if kind in ("comment", "string", "dollar"):
            chunk = "".join("\n" if ch == "\n" else " " for ch in text[s:e])
            if kind == "dollar":
                dollars.append(line_of(s))
        else:
            chunk = text[s:e]
        # Inner whitespace/comments are kept in masked even if trailing.
        masked.append(chunk)
        if kind not in ("ws", "comment"):
            end = e
        if kind == "word":
            w = text[s:e].upper()
            words.append(w)
            if _is_routine_definition(words):
                if w in ("BEGIN", "CASE") and len(words) > 1:
                    begin_depth += 1
                elif w == "END" and begin_depth > 0:
                    begin_depth -= 1
    flush()
    return statements


def _is_routine_definition(words):
    if not words or words[0] != "CREATE":
        return False
    if len(words) >= 2 and words[1] in ("FUNCTION", "PROCEDURE"):
        return True
    return len(words) >= 4 and words[1] == "OR" and words[2] == "REPLACE" and words[3] in ("FUNCTION", "PROCEDURE")


# Statements PostgreSQL refuses inside a transaction block.
_REWRITABLE = re.compile(
    r"^\s*(CREATE\s+(UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX|ALTER\s+TABLE)\b.*\bCONCURRENTLY\b",
    re.IGNORECASE | re.DOTALL)
_CONCURRENTLY = re.compile(r"\bCONCURRENTLY\b", re.IGNORECASE)
_NOT_IN_TX = re.compile(
    r"^\s*(VACUUM|CREATE\s+DATABASE|DROP\s+DATABASE|ALTER\s+SYSTEM|CREATE\s+TABLESPACE|DROP\s+TABLESPACE"
    r"|CREATE\s+SUBSCRIPTION|DROP\s+SUBSCRIPTION|ALTER\s+SUBSCRIPTION|REINDEX\s+(\([^)]*\)\s*)?(SYSTEM|DATABASE)"
    r"|CLUSTER\s*$|DISCARD\s+ALL|ALTER\s+TABLE\b.*\bDETACH\s+PARTITION\b.*\bFINALIZE)\b",
    re.IGNORECASE | re.DOTALL)
_TX_CONTROL = re.compile(
    r"^\s*(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE)


_SET_RE = re.compile(r"^\s*(?P<cmd>SET|RESET)\b(?:\s+(?P<scope>SESSION|LOCAL)\b)?"
                     r"(?:\s+(?P<what>[A-Za-z_][A-Za-z0-9_.]*))?", re.IGNORECASE)
_SET_CONFIG_RE = re.compile(r"\bset_config\s*\(", re.IGNORECASE)


def _call_args(masked, open_paren):
    """Top-level arguments (masked text) of the call whose '(' is at ``open_paren``."""
    depth = 0
    args = []
    start = open_paren + 1
    for i in range(open_paren, len(masked)):
        c = masked[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(masked[start:i])
                return args
        elif c == "," and depth == 1:
            args.append(masked[start:i])
            start = i + 1
    return args


def session_setting(stmt, transactional=True):
    """(position, why) when a statement changes a setting beyond its file's scope, else None.

    In a transactional file the engine owns the transaction, and a plain ``SET``,
    ``SET SESSION``, any ``RESET`` or ``set_config(..., false)`` outlives it: the setting
    stays on the runner's connection for the later migrations and, through PgBouncer
    transaction pooling, on a server connection other clients then use. ``SET LOCAL``,
    ``SET CONSTRAINTS``, ``SET TRANSACTION`` and ``set_config(..., true)`` end with the
    transaction and are fine. In a ``-- ledger:no-transaction`` file it is the other way
    round: ``SET LOCAL`` has no transaction to live in (PostgreSQL only warns), while a
    plain ``SET`` is discarded with the file's own connection. Only top-level statements
    are checked: function bodies and DO blocks are not.
    """
    m = _SET_RE.match(stmt.masked)
    if m:
        cmd = m.group("cmd").upper()
        scope = (m.group("scope") or "").upper()
        what = (m.group("what") or "").upper()
        if not transactional:
            if cmd == "SET" and scope == "LOCAL":
                return m.start("cmd") + 1, "local-outside-tx"
            return None
        if cmd == "SET" and scope == "LOCAL":
            return None
        if cmd == "SET" and not scope and what in ("CONSTRAINTS", "TRANSACTION"):
            return None
        return m.start("cmd") + 1, "session"
    if transactional:
        for call in _SET_CONFIG_RE.finditer(stmt.masked):
            args = _call_args(stmt.masked, call.end() - 1)
            if len(args) == 3 and args[2].strip().lower() != "true":
                return call.start() + 1, "set_config"
    return None


def needs_no_transaction(stmt):
    """Why a statement can't run inside a transaction block, or None."""
    if _REWRITABLE.match(stmt.masked):
        return "CONCURRENTLY"
    m = _NOT_IN_TX.match(stmt.masked)
    if m:
        return " ".join(m.group(1).split()[:2]).upper()
    return None


def rehearsal_form(stmt):
    """(text, note) to run a statement inside the rehearsal transaction.

    ``CREATE INDEX CONCURRENTLY`` (and DROP INDEX / REINDEX / DETACH PARTITION
    CONCURRENTLY) is rehearsed without CONCURRENTLY, which PostgreSQL allows in a
    transaction; the keyword is blanked with spaces so error positions (and so
    reported lines) stay exact. Statements that can never run in a transaction
    (VACUUM, CREATE DATABASE, ...) return (None, reason): they are not rehearsed.
    """
    if _REWRITABLE.match(stmt.masked):
        text = list(stmt.text)
        for m in _CONCURRENTLY.finditer(stmt.masked):
            for k in range(m.start(), m.end()):
                text[k] = " "
        return "".join(text), "rehearsed without CONCURRENTLY"
    reason = needs_no_transaction(stmt)
    if reason:
        return None, "%s can't run in a transaction: not rehearsed" % reason
    return stmt.text, None


# =========================================================================== migration set

class Migration(object):
    """One up migration of the set (``NNNN_name.sql``), with its optional down script.

    Attributes: version ('0008'), name, filename, path, checksum (sha256 hex of
    the file's bytes), down_path (or None), down_filename, transactional (False
    when the file's header says ``-- ledger:no-transaction``), statements (list
    of Statement), down_transactional, down_statements.
    """

    def __init__(self, version, name, filename, path, checksum, text, transactional, statements):
        self.version = version
        self.name = name
        self.filename = filename
        self.path = path
        self.checksum = checksum
        self.text = text
        self.transactional = transactional
        self.statements = statements
        self.down_path = None
        self.down_filename = None
        self.down_transactional = True
        self.down_statements = None

    def to_dict(self):
        return {
            "version": self.version,
            "name": self.name,
            "filename": self.filename,
            "path": self.path,
            "checksum": self.checksum,
            "down_path": self.down_path,
            "transactional": self.transactional,
            "statements": len(self.statements),
        }

    def __repr__(self):
        return "Migration(%s)" % self.filename


class DownScript(object):
    """A ``NNNN_name.down.sql`` whose up file is not in the set (kept so a revert can still use it)."""

    def __init__(self, version, name, filename, path, transactional, statements):
        self.version = version
        self.name = name
        self.filename = filename
        self.path = path
        self.transactional = transactional
        self.statements = statements


class MigrationSet(list):
    """The up migrations in version order (a list of Migration), plus ``orphan_downs``.

    ``directory`` is where they were read from; ``orphan_downs`` maps a version to a
    DownScript whose up file is missing (drift reports the missing file; a revert
    can still use the down script).
    """

    def __init__(self, items=(), directory=None, orphan_downs=None):
        super(MigrationSet, self).__init__(items)
        self.directory = directory
        self.orphan_downs = orphan_downs or {}

    def by_version(self):
        return dict((m.version, m) for m in self)

    def down_for(self, version):
        """(path, filename, transactional, statements) of the down script of a version, or None."""
        m = self.by_version().get(version)
        if m is not None and m.down_path:
            return (m.down_path, m.down_filename, m.down_transactional, m.down_statements)
        d = self.orphan_downs.get(version)
        if d is not None:
            return (d.path, d.filename, d.transactional, d.statements)
        return None


def parse_directives(text, filename):
    """The ``-- ledger:...`` directives of a file's header (comments before its first statement)."""
    found = []
    in_header = True
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("--"):
            m = DIRECTIVE_RE.match(line)
            if m:
                name = m.group("name")
                if name not in KNOWN_DIRECTIVES:
                    raise LedgerError("%s line %d: unknown directive 'ledger:%s' (known: %s)"
                                      % (filename, lineno, name, ", ".join("ledger:" + d for d in KNOWN_DIRECTIVES)),
                                      file=filename, line=lineno)
                if not in_header:
                    raise LedgerError("%s line %d: the directive 'ledger:%s' must be in the header, before the"
                                      " first statement" % (filename, lineno, name), file=filename, line=lineno)
                found.append(name)
            continue
        in_header = False
    return found


def _parse_file(path, filename):
    """(bytes, text, transactional, statements) of one SQL file, validated."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LedgerError("%s is not UTF-8 (%s)" % (filename, exc), file=filename)
    transactional = NO_TRANSACTION not in parse_directives(text, filename)
    try:
        statements = split_sql(text)
    except SqlSyntaxError as exc:
        raise LedgerError("%s line %d: %s" % (filename, exc.line, exc), file=filename, line=exc.line)
    if not statements:
        raise LedgerError("%s contains no SQL statement" % filename, file=filename)
    for st in statements:
        if "\\" in st.masked:
            ln = st.line_at(st.masked.index("\\") + 1)
            raise LedgerError("%s line %d: psql meta-commands (\\...) are not SQL; the engine runs SQL only"
                              % (filename, ln), file=filename, line=ln)
        if _TX_CONTROL.match(st.masked):
            raise LedgerError(
                "%s line %d: transaction control (%s) in a migration: the engine runs each migration in its own"
                " transaction together with its history row; remove BEGIN/COMMIT from the file"
                % (filename, st.line, st.keywords[0].upper()), file=filename, line=st.line)
        setting = session_setting(st, transactional)
        if setting:
            pos, kind = setting
            ln = st.line_at(pos)
            if kind == "local-outside-tx":
                why = ("SET LOCAL has no effect in a '-- ledger:no-transaction' file: there is no transaction to"
                       " scope it (PostgreSQL only warns). Write a plain SET: such a file runs on a connection of"
                       " its own that the engine resets and closes after the file, so the setting ends with it")
            elif kind == "set_config":
                why = ("set_config(name, value, false) changes the session, not the migration: the setting would"
                       " outlive the migration's transaction, stay on the engine's connection for the later"
                       " migrations and, through PgBouncer transaction pooling, on a server connection other"
                       " clients then use. Pass true as the third argument (transaction-local), or write SET LOCAL")
            else:
                why = ("a session-level %s outlives the migration's transaction: the setting would stay on the"
                       " engine's connection for the later migrations and, through PgBouncer transaction pooling,"
                       " on a server connection other clients then use. Write SET LOCAL ... (or"
                       " set_config(name, value, true)): it ends with the migration's transaction; a RESET is"
                       " then never needed" % " ".join(st.masked.split()[:2]))
            raise LedgerError("%s line %d: %s" % (filename, ln, why), file=filename, line=ln)
        if transactional:
            why = needs_no_transaction(st)
            if why:
                raise LedgerError(
                    "%s line %d: %s can't run inside a transaction block; put the statement in a migration of its"
                    " own whose header says '-- ledger:no-transaction' (see the migrate role's README)"
                    % (filename, st.line, why), file=filename, line=st.line)
    return raw, text, transactional, statements


def load_migration_set(directory):
    """Read a migration directory: up files ``NNNN_name.sql`` with optional ``NNNN_name.down.sql``.

    Returns a MigrationSet (a list of Migration in version order). Refuses, with a
    LedgerError naming the file (and line where there is one): a missing directory,
    a ``*.sql`` file whose name is not ``NNNN_name.sql`` / ``NNNN_name.down.sql``, two
    up (or two down) files with one version, a down script whose name differs from
    its up file's, an unknown or misplaced ``-- ledger:`` directive, an unterminated
    quote or comment, BEGIN/COMMIT or psql meta-commands in a file, and a statement
    that can't run in a transaction in a file without ``-- ledger:no-transaction``.
    ``*.down.sql`` files are never up migrations. Other files (README, ...) are ignored.
    """
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    if not os.path.isdir(directory):
        raise LedgerError("migrations_dir %s is not a directory" % directory)
    ups = {}
    downs = {}
    for filename in sorted(os.listdir(directory)):
        path = os.path.join(directory, filename)
        if not filename.lower().endswith(".sql") or filename.startswith(".") or not os.path.isfile(path):
            continue
        m = DOWN_RE.match(filename)
        if m:
            if m.group("version") in downs:
                raise LedgerError("duplicate down scripts for version %s: %s and %s"
                                  % (m.group("version"), downs[m.group("version")][2], filename), file=filename)
            downs[m.group("version")] = (m.group("name"), path, filename)
            continue
        m = UP_RE.match(filename)
        if not m:
            raise LedgerError("%s: a migration file is named NNNN_name.sql (4-digit version, then letters, digits"
                              " or _), or NNNN_name.down.sql for its revert; rename or remove it" % filename,
                              file=filename)
        version = m.group("version")
        if version in ups:
            raise LedgerError("duplicate version %s: %s and %s (each version appears once; renumber one)"
                              % (version, ups[version][2], filename), file=filename)
        ups[version] = (m.group("name"), path, filename)

    migrations = []
    for version in sorted(ups):
        name, path, filename = ups[version]
        raw, text, transactional, statements = _parse_file(path, filename)
        mig = Migration(version, name, filename, path, hashlib.sha256(raw).hexdigest(), text, transactional,
                        statements)
        if version in downs:
            dname, dpath, dfilename = downs.pop(version)
            if dname != name:
                raise LedgerError("%s does not match its up migration %s (same NNNN_name expected)"
                                  % (dfilename, filename), file=dfilename)
            _, _, dtx, dstatements = _parse_file(dpath, dfilename)
            mig.down_path, mig.down_filename, mig.down_transactional, mig.down_statements = \
                dpath, dfilename, dtx, dstatements
        migrations.append(mig)
    orphans = {}
    for version, (dname, dpath, dfilename) in downs.items():
        _, _, dtx, dstatements = _parse_file(dpath, dfilename)
        orphans[version] = DownScript(version, dname, dfilename, dpath, dtx, dstatements)
    return MigrationSet(migrations, directory=directory, orphan_downs=orphans)


# =========================================================================== inspection

def _as_conn(conn_or_url):
    if isinstance(conn_or_url, str):
        return connect(conn_or_url, autocommit=True), True
    return conn_or_url, False


def read_history(cur):
    """The rows of migrations.history in version order ([] when the records don't exist)."""
    cur.execute("SELECT to_regclass('migrations.history') IS NOT NULL")
    if not cur.fetchone()[0]:
        return None
    cur.execute("SELECT version, name, checksum, applied_at, applied_by, execution_ms, run_id, kind"
                " FROM migrations.history ORDER BY version")
    cols = ("version", "name", "checksum", "applied_at", "applied_by", "execution_ms", "run_id", "kind")
    rows = []
    for r in cur.fetchall():
        row = dict(zip(cols, r))
        if row["applied_at"] is not None:
            row["applied_at"] = row["applied_at"].astimezone(datetime.timezone.utc).isoformat()
        rows.append(row)
    return rows


def _drift(history, migrations):
    """Applied rows whose file was edited, deleted or renamed (see inspect())."""
    by_version = dict((m.version, m) for m in migrations)
    by_checksum = {}
    for m in migrations:
        by_checksum.setdefault(m.checksum, m)
    applied_versions = set(r["version"] for r in history)

    drift = []
    for row in history:
        m = by_version.get(row["version"])
        if m is None:
            moved = by_checksum.get(row["checksum"])
            if moved is not None and moved.version not in applied_versions:
                drift.append({
                    "version": row["version"], "kind": "renamed", "recorded_name": row["name"],
                    "recorded_checksum": row["checksum"], "filename": moved.filename, "file_checksum": moved.checksum,
                    "message": "applied %s (%s) is now the file %s (renumbered; recorded checksum %s, file checksum %s)"
                               % (row["version"], row["name"], moved.filename, row["checksum"], moved.checksum)})
            else:
                drift.append({
                    "version": row["version"], "kind": "missing", "recorded_name": row["name"],
                    "recorded_checksum": row["checksum"], "filename": None, "file_checksum": None,
                    "message": "applied %s (%s, recorded checksum %s) has no file in the set"
                               % (row["version"], row["name"], row["checksum"])})
        elif m.name != row["name"]:
            drift.append({
                "version": row["version"], "kind": "renamed", "recorded_name": row["name"],
                "recorded_checksum": row["checksum"], "filename": m.filename, "file_checksum": m.checksum,
                "message": "applied %s was recorded as %s; the file is now %s (recorded checksum %s, file %s)"
                           % (row["version"], row["name"], m.filename, row["checksum"], m.checksum)})
        elif m.checksum != row["checksum"]:
            drift.append({
                "version": row["version"], "kind": "edited", "recorded_name": row["name"],
                "recorded_checksum": row["checksum"], "filename": m.filename, "file_checksum": m.checksum,
                "message": "applied %s (%s) was edited since it was applied: recorded checksum %s, file checksum %s"
                           % (row["version"], m.filename, row["checksum"], m.checksum)})
    return drift


def inspect(conn, migrations, target=None, allow_out_of_order=False):
    """Compare a database's history with a migration set. Read-only: writes and creates nothing.

    ``conn`` is a psycopg2 connection or a URL. Returns a dict:
      records: bool, migrations.history exists;
      applied: history rows (version, name, checksum, applied_at, applied_by, execution_ms, run_id, kind);
      current: newest applied version or None;
      target: the effective target version (the newest in the set when None);
      pending: Migration objects to apply, in order (versions <= target not applied; files
               older than ``current`` only when allow_out_of_order);
      above_target: versions of the set not applied and above the target;
      drift: [{version, kind: edited|missing|renamed, recorded_name, recorded_checksum,
               filename, file_checksum, message}];
      out_of_order: [{version, filename, current, message}] (pending files older than current);
      target_problem: a message when the target is unusable (unknown version, below current), else None.
    """
    conn, own = _as_conn(conn)
    try:
        with conn.cursor() as cur:
            history = read_history(cur)
        if not conn.autocommit:
            conn.rollback()
    finally:
        if own:
            conn.close()
    records = history is not None
    history = history or []
    by_version = dict((m.version, m) for m in migrations)
    applied_versions = set(r["version"] for r in history)
    current = history[-1]["version"] if history else None
    drift = _drift(history, migrations)

    newest = migrations[-1].version if migrations else None
    target_problem = None
    eff_target = newest
    if target not in (None, "", "latest"):
        target = str(target)
        if not VERSION_RE.match(target):
            target_problem = "target %r is not a 4-digit version" % target
        elif target not in by_version and target not in applied_versions:
            target_problem = "target %s is not a version of the set (%s)" % (
                target, ", ".join(m.version for m in migrations) or "empty set")
        elif current and target < current:
            target_problem = ("target %s is below the applied version %s: a migrate never reverts; use"
                              " playbooks/rollback.yml -e rollback_to=%s" % (target, current, target))
        eff_target = target

    renamed_to = set(d["filename"] for d in drift if d["kind"] == "renamed")
    pending, above, out_of_order = [], [], []
    for m in migrations:
        if m.version in applied_versions or m.filename in renamed_to:
            continue  # a renumbered applied file is drift, not a pending migration
        if eff_target is not None and m.version > eff_target:
            above.append(m.version)
            continue
        if current and m.version < current:
            out_of_order.append({
                "version": m.version, "filename": m.filename, "current": current,
                "message": "%s is older than the newest applied version %s (out of order)" % (m.filename, current)})
            if not allow_out_of_order:
                continue
        pending.append(m)
    return {
        "records": records,
        "applied": history,
        "current": current,
        "target": eff_target,
        "pending": pending,
        "above_target": above,
        "drift": drift,
        "out_of_order": out_of_order if not allow_out_of_order else [],
        "out_of_order_allowed": out_of_order if allow_out_of_order else [],
        "target_problem": target_problem,
    }


def plan_problems(info):
    """What stops a run before any change: drift, out-of-order files, an unusable target."""
    problems = [d["message"] for d in info["drift"]]
    problems += [o["message"] + " (allow with allow_out_of_order / migrate_allow_out_of_order=true)"
                 for o in info["out_of_order"]]
    if info["target_problem"]:
        problems.append(info["target_problem"])
    return problems


# =========================================================================== settings and helpers

_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|min|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value, name="duration"):
    """(setting text for SET, seconds) of a PostgreSQL duration: 2s, 500ms, 1min, 0 (a bare number is ms)."""
    m = _DURATION_RE.match(str(value))
    if not m:
        raise LedgerError("%s must be a duration such as 2s, 500ms, 1min or 0 (got %r)" % (name, value))
    unit = m.group(2) or "ms"
    number = m.group(1)
    return "%s%s" % (number, unit), float(number) * _UNIT_S[unit]


def _settings(kw):
    s = dict(DEFAULTS)
    for k, v in kw.items():
        if v is not None:
            s[k] = v
    s["lock_timeout_sql"], s["lock_timeout_s"] = parse_duration(s["lock_timeout"], "lock_timeout")
    s["statement_timeout_sql"], s["statement_timeout_s"] = parse_duration(s["statement_timeout"], "statement_timeout")
    s["connection_check_sql"], _ = parse_duration(s["connection_check"], "connection_check")
    s["lock_retries"] = max(0, int(s["lock_retries"]))
    if s["lock_wait"] is None:
        s["lock_wait"] = float(s["lock_ttl"]) + LOCK_WAIT_MARGIN
    for k in ("retry_backoff", "retry_backoff_max", "lock_wait", "lock_ttl"):
        s[k] = float(s[k])
    if s["lock_ttl"] < 1:
        raise LedgerError("lock_ttl must be at least 1 second")
    return s


def _set_local(cur, s, local=True):
    scope = "SET LOCAL" if local else "SET"
    cur.execute("%s lock_timeout = %%s" % scope, (s["lock_timeout_sql"],))
    cur.execute("%s statement_timeout = %%s" % scope, (s["statement_timeout_sql"],))
    # A runner killed mid-statement: the server checks the socket and ends the
    # backend (and so the transaction) instead of finishing a pg_sleep/long query.
    cur.execute("%s client_connection_check_interval = %%s" % scope, (s["connection_check_sql"],))


def _backoff(s, attempt):
    """Exponential back-off with jitter: base * 2^attempt, times a random factor in [0.5, 1.5)."""
    delay = s["retry_backoff"] * (2 ** attempt) * (0.5 + random.random())
    return min(delay, s["retry_backoff_max"])


def _ms(t0):
    return int(round((time.monotonic() - t0) * 1000))


def _quote_ident(name):
    if re.match(r"^[a-z_][a-z0-9_$]*$", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _safe_rollback(conn):
    try:
        if not conn.closed:
            conn.rollback()
        return True
    except Exception:  # noqa: BLE001 - the connection is gone; the server rolls back
        return False


def _err_line(stmt, err, dollar_line_hint=True):
    """File line of an error raised by one statement (position, PL/pgSQL context, or statement start)."""
    if err.get("position"):
        return stmt.line_at(err["position"])
    ctx = err.get("context") or ""
    m = re.search(r"inline_code_block line ([0-9]+)", ctx)
    if m and stmt.dollar_lines and dollar_line_hint:
        return stmt.dollar_lines[0] + int(m.group(1)) - 1
    return stmt.line


def _blockers(conn, s):
    """Sessions holding relation locks in this database for longer than lock_timeout (likely blockers)."""
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT a.pid, a.usename, a.application_name, a.state,"
                " extract(epoch FROM now() - a.xact_start)::int, left(a.query, 80)"
                " FROM pg_catalog.pg_stat_activity a"
                " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL"
                "   AND a.xact_start < now() - %s::interval"
                "   AND EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid = a.pid"
                "               AND l.locktype = 'relation' AND l.granted)"
                " ORDER BY a.xact_start LIMIT 5", (s["lock_timeout_sql"],))
            return [{"pid": r[0], "user": r[1], "application": r[2], "state": r[3], "xact_age_s": r[4],
                     "query": redact(r[5])} for r in cur.fetchall()]
    except Exception:  # noqa: BLE001 - diagnostics only
        _safe_rollback(conn)
        return []


def invalid_indexes(conn):
    """INVALID indexes of the database: [{schema, index, table, cleanup}] (left by a failed CONCURRENTLY build)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT n.nspname, c.relname, t.relname FROM pg_catalog.pg_index i"
            " JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_catalog.pg_class t ON t.oid = i.indrelid"
            " WHERE NOT i.indisvalid ORDER BY 1, 2")
        out = []
        for schema, index, table in cur.fetchall():
            qualified = "%s.%s" % (_quote_ident(schema), _quote_ident(index))
            out.append({"schema": schema, "index": index, "table": table,
                        "cleanup": "DROP INDEX CONCURRENTLY IF EXISTS %s;" % qualified})
        return out


def connection_route(conn, url=None):
    """How a connection reaches PostgreSQL: {client_port, server_port, pooled}.

    A pooler (PgBouncer) or proxy listens on a port of its own and reaches PostgreSQL
    on PostgreSQL's ``port``. When the port this connection was opened to differs from
    the server's ``port`` setting, something sits in between: the engine then assumes
    a pooler, whose server connections (and so their session settings) are shared
    with other clients. Port forwarding (a container's published port, an SSH tunnel)
    looks the same; a pooler listening on PostgreSQL's own port is not detected.
    ``conn`` must be in autocommit mode.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('port')::int, inet_server_port()")
        server_port, inet_port = cur.fetchone()
    client_port = None
    try:
        client_port = int(conn.info.port)
    except Exception:  # noqa: BLE001 - older psycopg2: fall back to the URL
        if url:
            try:
                client_port = int(parse_url(url)["port"])
            except Exception:  # noqa: BLE001
                client_port = None
    pooled = client_port is not None and client_port != int(server_port)
    return {"client_port": client_port, "server_port": int(server_port), "backend_tcp_port": inet_port,
            "pooled": pooled}


def _db_identity(conn):
    """(database, its oid, server start time): equal for two connections that reach the same database."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_database(), d.oid, pg_postmaster_start_time() FROM pg_catalog.pg_database d"
                    " WHERE d.datname = current_database()")
        return tuple(cur.fetchone())


def _reset_session(conn):
    """Discard every session setting of a connection of our own (a direct one, never a pooled one)."""
    if conn is None or conn.closed:
        return
    try:
        _safe_rollback(conn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("RESET ALL")
    except Exception:  # noqa: BLE001 - the connection is closed right after anyway
        pass


def _named_in(migration_statements, name):
    pat = re.compile(r'(?<![A-Za-z0-9_$"])"?%s"?(?![A-Za-z0-9_$])' % re.escape(name), re.IGNORECASE)
    return any(pat.search(st.masked) for st in migration_statements)


# =========================================================================== rehearsal

def rehearse(url, pending, lock_timeout=None, statement_timeout=None, lock_retries=None, retry_backoff=None,
             run_id=None, record_event=False, rehearse_concurrently=True, conn=None, **_ignored):
    """Run ``pending`` for real in ONE transaction that is rolled back; report per file.

    Files run in order, one savepoint each, so each sees the objects of the ones
    before it. Nothing is written (the transaction is rolled back; no records
    schema is created), except that sequences advanced by a rehearsal stay
    advanced (PostgreSQL never rolls back nextval). With ``record_event=True`` (the
    rehearsal of a real run, e.g. precheck) one ``rehearse`` event is appended
    afterwards; a ``--check`` run leaves it False and writes nothing at all.

    Non-transactional files (``-- ledger:no-transaction``) are rehearsed as far as
    possible: CONCURRENTLY index operations run without CONCURRENTLY (the plain
    form is allowed in a transaction; note it takes a SHARE lock, blocking writes
    to the table for the build, bounded by lock_timeout to acquire it); VACUUM,
    CREATE DATABASE and the like are listed in ``skipped_statements``. With
    ``rehearse_concurrently=False`` the CONCURRENTLY statements are skipped too.

    A lock timeout (55P03) rolls the whole rehearsal back (releasing every lock it
    took) and retries it after a back-off, up to ``lock_retries`` times.

    ``conn``: an optional open connection to use instead of ``url`` (left open, in its
    autocommit mode; a transaction open on it is rolled back first).

    Returns a list, one dict per file, in order: version, filename, status
    (``would_apply`` | ``would_fail`` | ``not_rehearsed``), duration_ms,
    skipped_statements, notices; a would_fail also has sqlstate, message, detail,
    hint, file, line, statement. Connection failures raise LedgerError.
    """
    s = _settings({"lock_timeout": lock_timeout, "statement_timeout": statement_timeout,
                   "lock_retries": lock_retries, "retry_backoff": retry_backoff})
    pending = list(pending)
    own = conn is None
    if own:
        conn = connect(url, autocommit=True)
    t0 = time.monotonic()
    try:
        attempt = 0
        while True:
            results, retry = _rehearse_once(conn, pending, s, rehearse_concurrently)
            if not retry or attempt >= s["lock_retries"]:
                break
            time.sleep(_backoff(s, attempt))
            attempt += 1
    finally:
        if own:
            conn.close()
    if record_event and pending:
        failed = [r for r in results if r["status"] == "would_fail"]
        log_event_autonomous(url, run_id or new_run_id(), "rehearse", "failed" if failed else "ok",
                             version=failed[0]["version"] if failed else pending[-1].version,
                             duration_ms=_ms(t0),
                             detail={"results": [dict((k, r.get(k)) for k in
                                                      ("version", "filename", "status", "sqlstate", "line",
                                                       "message")) for r in results],
                                     "attempts": attempt + 1})
    return results


def _rehearse_once(conn, pending, s, rehearse_concurrently):
    results = []
    was_autocommit = conn.autocommit
    if not was_autocommit:
        conn.rollback()  # start from a clean transaction: the rehearsal rolls everything back
    conn.autocommit = False
    failed = False
    retry = False
    try:
        with conn.cursor() as cur:
            _set_local(cur, s)
            for m in pending:
                if failed:
                    results.append({"version": m.version, "filename": m.filename, "status": "not_rehearsed",
                                    "reason": "an earlier migration would fail"})
                    continue
                res = {"version": m.version, "filename": m.filename, "status": "would_apply",
                       "transactional": m.transactional, "skipped_statements": [], "notices": []}
                t1 = time.monotonic()
                del conn.notices[:]
                cur.execute("SAVEPOINT ledger_rehearsal")
                stmt = None
                try:
                    for stmt in m.statements:
                        text, note = rehearsal_form(stmt)
                        if note and (text is None or not rehearse_concurrently):
                            res["skipped_statements"].append({"line": stmt.line, "statement": stmt.summary(80),
                                                              "reason": note if text is None else
                                                              "CONCURRENTLY: not rehearsed"})
                            continue
                        if note:
                            res.setdefault("notes", []).append("line %d: %s" % (stmt.line, note))
                        cur.execute(text)
                    cur.execute("RELEASE SAVEPOINT ledger_rehearsal")
                except psycopg2.Error as exc:
                    err = pg_error(exc)
                    if conn.closed or exc.pgcode is None:
                        raise LedgerError("the connection was lost during the rehearsal of %s: %s"
                                          % (m.filename, err["message"]), file=m.filename)
                    cur.execute("ROLLBACK TO SAVEPOINT ledger_rehearsal")
                    res.update({"status": "would_fail", "sqlstate": err["sqlstate"], "message": err["message"],
                                "detail": err["detail"], "hint": err["hint"], "file": m.filename,
                                "file_path": m.path, "line": _err_line(stmt, err),
                                "statement": stmt.summary()})
                    if err["sqlstate"] in RETRIABLE:
                        retry = True
                    failed = True
                res["duration_ms"] = _ms(t1)
                res["notices"] = [n.strip() for n in conn.notices][-20:]
                results.append(res)
    finally:
        _safe_rollback(conn)
        if not conn.closed:
            conn.autocommit = was_autocommit
    return results, retry


def format_rehearsal(results):
    """Human lines for a rehearsal: `0010_x.sql: would apply` / `... would fail at line 7: SQLSTATE ...`."""
    lines = []
    for r in results:
        if r["status"] == "would_apply":
            extra = ""
            if r.get("skipped_statements"):
                extra = " (%d statement(s) not rehearsed: %s)" % (
                    len(r["skipped_statements"]), "; ".join("line %d %s" % (x["line"], x["reason"])
                                                           for x in r["skipped_statements"]))
            lines.append("%s: would apply (%d ms)%s" % (r["filename"], r.get("duration_ms", 0), extra))
        elif r["status"] == "would_fail":
            line = "%s: would fail at line %s: SQLSTATE %s: %s" % (r["filename"], r["line"], r["sqlstate"],
                                                                  r["message"])
            if r.get("hint"):
                line += " (hint: %s)" % r["hint"]
            lines.append(line)
        else:
            lines.append("%s: not rehearsed (%s)" % (r["filename"], r.get("reason", "")))
    return lines


# =========================================================================== the lease

class Lease(object):
    """The run lease in migrations.lock (one row, id = 1): see the module docstring.

    acquire() polls with FOR UPDATE NOWAIT, sleeping outside any transaction, for at
    most ``wait`` seconds; takes an absent or expired lease; logs lock_wait events;
    raises LedgerError naming the holder when the wait runs out. A heartbeat
    thread renews the lease every ttl/3 seconds on its own connection (skipping
    while a migration transaction of this run holds the row). release() deletes it.

    Ownership is decided by a token unique to this Lease object, never by the run
    id alone: every inventory host of one playbook run shares ``ledger_run_id``, and
    two hosts may point at one database (one through PgBouncer, one direct). The
    token is ``run_id:<random hex>``; the row stores the run id in ``run_id`` and
    the random part in ``holder`` (``user@host pid N lease <hex>``), and every check
    (take, renew, lock in a migration transaction, release) compares both.
    """

    def __init__(self, url, conn, run_id, ttl=60.0, wait=None, limit=None, poll=0.5):
        self.url = url
        self.conn = conn
        self.run_id = run_id
        self.ttl = float(ttl)
        self.wait = float(wait) if wait is not None else self.ttl + LOCK_WAIT_MARGIN
        self.limit = limit
        self.poll = poll
        self.nonce = uuid.uuid4().hex[:16]
        self.token = "%s:%s" % (run_id, self.nonce)
        self.holder = "%s pid %d lease %s" % (actor(), os.getpid(), self.nonce)
        self.held = False
        self.lost = None
        self.waited_s = 0.0
        self.takeover = None
        self._stop = threading.Event()
        self._thread = None

    # ---------------------------------------------------------------- internals
    def _read(self, cur):
        cur.execute("SELECT run_id, holder, acquired_at, renewed_at, expires_at,"
                    " extract(epoch FROM now() - acquired_at)::int, extract(epoch FROM now() - renewed_at)::int,"
                    " extract(epoch FROM expires_at - now())::int"
                    " FROM migrations.lock WHERE id = 1")
        r = cur.fetchone()
        if r is None:
            return None
        return {"run_id": r[0], "holder": r[1], "acquired_at": r[2].isoformat(), "renewed_at": r[3].isoformat(),
                "expires_at": r[4].isoformat(), "age_s": r[5], "renewed_s_ago": r[6], "expires_in_s": r[7]}

    def _try(self):
        """('acquired', previous-holder-or-None) or ('busy', holder-info)."""
        conn = self.conn
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '1s'")
                try:
                    cur.execute("SELECT run_id, expires_at < now(), holder FROM migrations.lock WHERE id = 1"
                                " FOR UPDATE NOWAIT")
                except psycopg2.Error as exc:
                    if exc.pgcode != "55P03":
                        raise
                    conn.rollback()
                    conn.autocommit = True
                    with conn.cursor() as cur2:
                        return "busy", self._read(cur2)
                row = cur.fetchone()
                if row is None:
                    cur.execute("INSERT INTO migrations.lock (id, run_id, holder, acquired_at, renewed_at, expires_at)"
                                " VALUES (1, %s, %s, now(), now(), clock_timestamp() + %s * interval '1 second')"
                                " ON CONFLICT (id) DO NOTHING RETURNING id", (self.run_id, self.holder, self.ttl))
                    if cur.fetchone() is None:
                        conn.rollback()
                        conn.autocommit = True
                        with conn.cursor() as cur2:
                            return "busy", self._read(cur2)
                    conn.commit()
                    return "acquired", None
                mine = self._is_mine(row[0], row[2])
                if mine or row[1]:
                    previous = None if mine else self._read(cur)
                    cur.execute("UPDATE migrations.lock SET run_id = %s, holder = %s, acquired_at = now(),"
                                " renewed_at = now(), expires_at = clock_timestamp() + %s * interval '1 second'"
                                " WHERE id = 1", (self.run_id, self.holder, self.ttl))
                    conn.commit()
                    return "acquired", previous
                info = self._read(cur)
                conn.rollback()
                return "busy", info
        except psycopg2.Error as exc:
            _safe_rollback(conn)
            if exc.pgcode == "55P03":
                return "busy", None
            raise
        finally:
            if not conn.closed:
                conn.autocommit = True

    def _is_mine(self, run_id, holder):
        """Whether a lease row (run_id, holder) is this Lease object's (not merely this run id's)."""
        return run_id == self.run_id and holder == self.holder

    def _event(self, outcome, duration_ms=None, detail=None):
        try:
            with self.conn.cursor() as cur:
                log_event(cur, self.run_id, "lock_wait", outcome, duration_ms=duration_ms, detail=detail)
        except psycopg2.Error:
            _safe_rollback(self.conn)

    # ---------------------------------------------------------------- API
    def acquire(self):
        t0 = time.monotonic()
        deadline = t0 + self.wait
        logged = False
        holder = None
        while True:
            try:
                state, info = self._try()
            except psycopg2.Error as exc:
                raise LedgerError("cannot take the run lease on %s: %s" % (describe_target(self.url),
                                                                         pg_error(exc)["message"]),
                                  target=describe_target(self.url), sqlstate=exc.pgcode)
            if state == "acquired":
                self.held = True
                self.waited_s = round(time.monotonic() - t0, 2)
                if info is not None:
                    self.takeover = info
                    self._event("taken_over", _ms(t0), {"previous": info})
                elif logged:
                    self._event("acquired", _ms(t0), {"waited_s": self.waited_s, "previous": holder})
                self._start_heartbeat()
                return self
            holder = info or holder
            if not logged:
                self._event("waiting", None, {"holder": holder, "lock_wait_s": self.wait})
                logged = True
            now = time.monotonic()
            if now >= deadline:
                self._event("timeout", _ms(t0), {"holder": holder})
                raise LedgerError(self._busy_message(holder), target=describe_target(self.url), holder=holder,
                                  sqlstate="55P03", next_command=self._busy_next(holder))
            time.sleep(min(deadline - now, self.poll * (0.5 + random.random())))

    def _busy_message(self, h):
        target = describe_target(self.url)
        if not h:
            return ("another migration run holds %s (the lease row is locked by its running migration);"
                    " waited %ds" % (target, self.wait))
        return ("another migration run holds %s: run %s by %s, lease taken %ss ago, renewed %ss ago, expires at %s"
                " (in %ss); waited %ds for it" % (target, h["run_id"], h["holder"], h["age_s"], h["renewed_s_ago"],
                                                  h["expires_at"], h["expires_in_s"], self.wait))

    def _busy_next(self, h):
        cmd = "ansible-playbook playbooks/migrate.yml -l %s" % (self.limit or "<limit>")
        return ("wait for that run to finish and re-run `%s` (a run that died frees the target by itself when its"
                " lease expires%s)" % (cmd, (", at %s" % h["expires_at"]) if h else ""))

    def check_in_tx(self, cur):
        """Inside a migration transaction: lock the lease row (held until commit) and check it is ours."""
        cur.execute("SELECT run_id, holder FROM migrations.lock WHERE id = 1 FOR UPDATE")
        row = cur.fetchone()
        if row is None or not self._is_mine(row[0], row[1]):
            raise LedgerError("this run lost its lease on %s (%s): stopped before the next migration"
                              % (describe_target(self.url),
                                 "now held by run %s, %s" % (row[0], row[1]) if row else "nobody holds it"),
                              target=describe_target(self.url))

    def renew_in_tx(self, cur):
        cur.execute("UPDATE migrations.lock SET renewed_at = clock_timestamp(),"
                    " expires_at = clock_timestamp() + %s * interval '1 second'"
                    " WHERE id = 1 AND run_id = %s AND holder = %s",
                    (self.ttl, self.run_id, self.holder))

    def _start_heartbeat(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="ledger-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        interval = max(0.3, self.ttl / 3.0)
        hb = None
        while not self._stop.wait(interval):
            try:
                if hb is None or hb.closed:
                    hb = connect(self.url, autocommit=False)
                with hb.cursor() as cur:
                    cur.execute("SET LOCAL lock_timeout = '1s'")
                    try:
                        cur.execute("SELECT run_id, holder FROM migrations.lock WHERE id = 1 FOR UPDATE NOWAIT")
                    except psycopg2.Error as exc:
                        hb.rollback()
                        if exc.pgcode == "55P03":
                            continue  # our own migration transaction holds it: protected
                        raise
                    row = cur.fetchone()
                    if row is None or not self._is_mine(row[0], row[1]):
                        self.lost = "%s (%s)" % (row[0], row[1]) if row else "nobody"
                        hb.rollback()
                        continue
                    self.renew_in_tx(cur)
                hb.commit()
            except Exception:  # noqa: BLE001 - a missed beat is retried; the main thread reports real errors
                if hb is not None:
                    _safe_rollback(hb)
        if hb is not None and not hb.closed:
            hb.close()

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.held:
            return
        self.held = False
        try:
            conn = self.conn if not self.conn.closed else connect(self.url, autocommit=True)
            _safe_rollback(conn)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("DELETE FROM migrations.lock WHERE id = 1 AND run_id = %s AND holder = %s",
                            (self.run_id, self.holder))
        except Exception:  # noqa: BLE001 - it expires by itself
            pass


def _ensure_records(conn):
    """Create the records schema (idempotent; retried when two first runs race on it)."""
    for attempt in range(5):
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                created = ensure_records(cur)
            conn.commit()
            return created
        except psycopg2.Error as exc:
            _safe_rollback(conn)
            if exc.pgcode not in ("23505", "42P06", "42P07", "40P01") or attempt == 4:
                raise LedgerError("cannot create the migrations records schema: %s" % pg_error(exc)["message"],
                                  sqlstate=exc.pgcode)
            time.sleep(0.1 * (attempt + 1))
        finally:
            if not conn.closed:
                conn.autocommit = True
    return False


# =========================================================================== running one migration

class _StepFailed(Exception):
    """A statement of a migration failed: carries what the failure report needs."""

    def __init__(self, err, stmt, lost=False, no_retry=False):
        super(_StepFailed, self).__init__(err.get("message"))
        self.err = err
        self.stmt = stmt
        self.lost = lost
        self.no_retry = no_retry


def _run_statements(cur, statements):
    stmt = None
    try:
        for stmt in statements:
            cur.execute(stmt.text)
    except psycopg2.Error as exc:
        raise _StepFailed(_one_line(pg_error(exc)), stmt, lost=exc.pgcode is None or bool(cur.connection.closed))


def _one_line(err):
    """psycopg2's connection errors span lines: keep messages on one line."""
    if err.get("message"):
        err["message"] = " ".join(err["message"].split())
    return err


def _run_in_tx(conn, lease, s, statements, finish):
    """One transaction: SET LOCAL timeouts, lease row lock, statements, finish(cur), lease renewal, COMMIT.

    Returns execution_ms of the statements. Raises _StepFailed (statement error),
    _CommitUnknown, psycopg2.Error (bookkeeping error) or LedgerError (lease lost).
    """
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            try:
                _set_local(cur, s)
                if lease is not None:
                    lease.check_in_tx(cur)
            except psycopg2.Error as exc:
                raise _StepFailed(_one_line(pg_error(exc)), None, lost=exc.pgcode is None)
            t1 = time.monotonic()
            _run_statements(cur, statements)
            ms = _ms(t1)
            try:
                cur.execute("RESET ROLE")
                finish(cur, ms)
                if lease is not None:
                    lease.renew_in_tx(cur)
            except psycopg2.Error as exc:
                raise _StepFailed(_one_line(pg_error(exc)), None, lost=exc.pgcode is None)
        try:
            conn.commit()
        except psycopg2.Error as exc:
            raise _CommitUnknown(pg_error(exc))
        return ms
    except BaseException:
        _safe_rollback(conn)
        raise
    finally:
        if not conn.closed:
            conn.autocommit = True


class _CommitUnknown(Exception):
    def __init__(self, err):
        super(_CommitUnknown, self).__init__(err.get("message"))
        self.err = err


class _Runner(object):
    """State of one apply or revert run (connection, lease, settings, what it did)."""

    def __init__(self, url, migrations, run_id, s, limit, action, direct_url=None):
        self.url = url
        self.direct_url = direct_url or None
        self.direct_checked = False
        self.route = None
        self.target = describe_target(url)
        self.migrations = migrations
        self.run_id = run_id or new_run_id()
        self.s = s
        self.limit = limit or "<limit>"
        self.action = action
        self.conn = connect(url, autocommit=True)
        self.lease = None
        self.done = []
        self.version_before = None

    def close(self):
        try:
            if self.lease is not None:
                self.lease.release()
        finally:
            if not self.conn.closed:
                self.conn.close()

    def take_lease(self):
        _ensure_records(self.conn)
        self.lease = Lease(self.url, self.conn, self.run_id, ttl=self.s["lock_ttl"], wait=self.s["lock_wait"],
                           limit=self.limit)
        self.lease.acquire()

    # ------------------------------------------------------------------ no-transaction files
    def check_nontx_route(self, files, records=True):
        """Before any change: refuse no-transaction files through a pooler unless direct_url is set.

        ``files``: (version, filename) of the no-transaction files (up or down) this run
        would execute. Their statements run outside a transaction, so their settings
        can't be SET LOCAL; through PgBouncer's transaction pooling they would land on
        server connections that other clients then use. They run on a connection of
        their own: to direct_url when set (checked to reach the same database), else to
        the database URL, which must then not go through a pooler.
        """
        if not files:
            return
        names = ", ".join(f for _, f in files)
        if self.direct_url:
            if self.direct_checked:
                return
            try:
                dconn = connect(self.direct_url, autocommit=True)
            except LedgerError as exc:
                raise LedgerError("migrate_direct_url (for %s): %s" % (names, exc.msg),
                                  target=self.target, direct_target=describe_target(self.direct_url),
                                  next_command="fix migrate_direct_url (it must reach PostgreSQL directly)")
            try:
                same = _db_identity(dconn) == _db_identity(self.conn)
            finally:
                dconn.close()
            if not same:
                raise LedgerError(
                    "refusing to %s on %s before any change: migrate_direct_url (%s) does not reach the same database"
                    " (another database name, oid or server)\n  next: point migrate_direct_url at the same database"
                    " as database_url, connecting to PostgreSQL directly" % (
                        self.action, self.target, describe_target(self.direct_url)),
                    target=self.target, direct_target=describe_target(self.direct_url),
                    next_command="point migrate_direct_url at the same database as database_url")
            self.direct_checked = True
            return
        if self.route is None:
            self.route = connection_route(self.conn, self.url)
        if not self.route["pooled"]:
            return
        rt = self.route
        rerun = ("ansible-playbook playbooks/rollback.yml -l %s -e rollback_to=..." if self.action == "revert"
                 else "ansible-playbook playbooks/migrate.yml -l %s") % self.limit
        nxt = ("set migrate_direct_url for this host (in the inventory) to a URL of the same database that reaches"
               " PostgreSQL directly, not through the pooler (the server listens on port %s):"
               " migrate_direct_url: postgresql://USER@DBHOST:%s/DBNAME; it is used only for the no-transaction"
               " files; then re-run `%s`. If this URL does reach PostgreSQL directly (a forwarded port), set"
               " migrate_direct_url to this same URL" % (rt["server_port"], rt["server_port"], rerun))
        msg = ("refusing to %s on %s before any change: %s run(s) outside a transaction (-- ledger:no-transaction), and"
               " this URL goes through a connection pooler or proxy (it connects to port %s; the server listens on"
               " port %s). Outside a transaction, settings can't be SET LOCAL: the session settings of such a file"
               " (lock_timeout, statement_timeout, client_connection_check_interval, its own SETs) would land on pooled"
               " server connections that other clients then use, and PgBouncer in transaction mode may run"
               " consecutive statements on different server connections\n  next: %s"
               % (self.action, self.target, names, rt["client_port"], rt["server_port"], nxt))
        if records:
            self.event(self.action, "refused", None, None,
                       {"problems": ["no-transaction file(s) through a pooler: %s" % names], "route": rt})
        raise LedgerError(msg, target=self.target, route=rt, nontx_files=[f for _, f in files],
                          next_command=nxt, applied=[d["version"] for d in self.done])

    def nontx_conn(self):
        """A connection of its own for one no-transaction file: direct_url, else the database URL.

        It is reset and closed after the file, so nothing the file sets outlives it.
        """
        return connect(self.direct_url or self.url, autocommit=True)

    def reconnect(self):
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        self.conn = connect(self.url, autocommit=True)
        if self.lease is not None:
            self.lease.conn = self.conn

    def event(self, action, outcome, version=None, duration_ms=None, detail=None):
        """Append an event on the run's connection (autocommit), or on a new one if it is gone."""
        try:
            if self.conn.closed:
                raise psycopg2.InterfaceError("closed")
            with self.conn.cursor() as cur:
                log_event(cur, self.run_id, action, outcome, version, duration_ms, detail)
        except Exception:  # noqa: BLE001
            _safe_rollback(self.conn)
            log_event_autonomous(self.url, self.run_id, action, outcome, version, duration_ms, detail)

    # ------------------------------------------------------------------ retries
    def with_retries(self, label, version, filename, fn):
        """Run fn() (one whole transaction) again after a lock timeout/deadlock, with back-off and jitter."""
        attempt = 0
        while True:
            try:
                return fn(), attempt + 1
            except _StepFailed as exc:
                code = exc.err.get("sqlstate")
                if code in RETRIABLE and attempt < self.s["lock_retries"] and not exc.lost and not exc.no_retry:
                    delay = _backoff(self.s, attempt)
                    line = exc.stmt.line if exc.stmt is not None else None
                    self.event("lock_wait", "retry", version, None, {
                        "kind": "lock_timeout" if code == "55P03" else "deadlock", "sqlstate": code,
                        "attempt": attempt + 1, "retries": self.s["lock_retries"], "retry_in_s": round(delay, 2),
                        "file": filename, "line": line, "lock_timeout": self.s["lock_timeout_sql"],
                        "message": exc.err.get("message"), "blockers": _blockers(self.conn, self.s),
                        "stage": label})
                    time.sleep(delay)
                    attempt += 1
                    continue
                exc.attempts = attempt + 1
                raise

    # ------------------------------------------------------------------ failure report
    def fail(self, m_version, filename, path, exc, stage, extra=None, next_command=None, advice=None):
        err = exc.err
        stmt = exc.stmt
        line = _err_line(stmt, err) if stmt is not None else None
        attempts = getattr(exc, "attempts", 1)
        fields = {
            "target": self.target, "version": m_version, "file": filename, "file_path": path, "line": line,
            "sqlstate": err.get("sqlstate"), "message": err.get("message"), "detail": err.get("detail"),
            "hint": err.get("hint"), "statement": stmt.summary() if stmt is not None else None,
            "attempts": attempts, "run_id": self.run_id, "applied" if self.action == "apply" else "reverted":
                [d["version"] for d in self.done], "version_before": self.version_before,
        }
        if err.get("sqlstate") in RETRIABLE:
            fields["blockers"] = _blockers(self.conn, self.s) if not self.conn.closed else []
        if extra:
            fields.update(extra)
        where = "%s line %s" % (filename, line) if line else filename
        msg = "%s of %s failed on %s at %s: SQLSTATE %s: %s" % (
            stage, m_version, self.target, where, err.get("sqlstate") or "?", err.get("message"))
        if err.get("detail"):
            msg += "\n  detail: %s" % err["detail"]
        if err.get("hint"):
            msg += "\n  hint: %s" % err["hint"]
        if stmt is not None:
            msg += "\n  statement (line %d): %s" % (stmt.line, stmt.summary())
        if err.get("sqlstate") in RETRIABLE:
            msg += ("\n  lock not obtained within lock_timeout=%s after %d attempt(s) with back-off"
                    % (self.s["lock_timeout_sql"], attempts))
            for b in fields.get("blockers") or []:
                msg += ("\n  likely blocker: pid %s (%s, %s, %s, transaction open %ss): %s"
                        % (b["pid"], b["user"], b["application"], b["state"], b["xact_age_s"], b["query"]))
        elif err.get("sqlstate") == "57014":
            msg += "\n  the statement ran longer than statement_timeout=%s" % self.s["statement_timeout_sql"]
        if advice:
            msg += "\n  " + advice
        fields["next_command"] = next_command
        msg += "\n  next: %s" % next_command
        fields["msg"] = msg
        started = getattr(self, "t_step", None)
        self.event(self.action, "failed", m_version, _ms(started) if started else None,
                   dict((k, v) for k, v in fields.items() if k != "msg"))
        return LedgerError(msg, **dict((k, v) for k, v in fields.items() if k != "msg"))


# =========================================================================== apply

def apply(url, migrations, target=None, run_id=None, limit=None, allow_out_of_order=False, lock_timeout=None,
          statement_timeout=None, lock_retries=None, retry_backoff=None, lock_wait=None, lock_ttl=None,
          connection_check=None, direct_url=None, **_ignored):
    """Apply the pending migrations of ``migrations`` (up to ``target``) to the database at ``url``.

    Order of work: a read-only inspection (nothing pending: return at once, no
    write at all, changed False); refusal before any change on drift, out-of-order
    files or an unusable target (with a failure event when the records exist); the
    records schema; the lease (waiting up to ``lock_wait`` s); a second inspection
    under the lease; then each migration:

    * transactional: one transaction holding ``SET LOCAL lock_timeout /
      statement_timeout / client_connection_check_interval``, the lease row lock,
      the statements, the history row, the ``apply`` event and the lease renewal;
      a lock timeout or deadlock rolls it back and retries it after
      ``retry_backoff * 2^n`` s (jittered) up to ``lock_retries`` times (each retry
      is a ``lock_wait`` event);
    * ``-- ledger:no-transaction``: statement by statement in autocommit on a
      connection of its own (session timeouts; RESET ALL and closed afterwards), then
      the history row and event in one short transaction. That connection goes to
      ``direct_url`` when given (checked to reach the same database), else to ``url``,
      which must then not go through a pooler (see connection_route()): through
      PgBouncer such files are refused before any change. Refused first if an INVALID
      index named in the file exists; on failure the INVALID indexes it left are
      reported with their cleanup SQL.

    ``lock_wait`` defaults to ``lock_ttl + 30`` s, so a run started right after a
    runner was killed outwaits the dead run's lease.

    Returns {changed, applied: [{version, name, filename, execution_ms, attempts,
    transactional}], pending: [], above_target: [versions above the target], version_before,
    version_after, run_id, target, lock: {waited_s, takeover}, msg}. Raises
    LedgerError with fields (target, version, file, line, sqlstate, message, hint,
    statement, applied, next_command, ...) on any failure: the failed migration is
    rolled back (or, non-transactional, reported with what it left) and its
    ``apply`` event with outcome ``failed`` is written on its own connection.
    """
    s = _settings({"lock_timeout": lock_timeout, "statement_timeout": statement_timeout,
                   "lock_retries": lock_retries, "retry_backoff": retry_backoff, "lock_wait": lock_wait,
                   "lock_ttl": lock_ttl, "connection_check": connection_check})
    r = _Runner(url, migrations, run_id, s, limit, "apply", direct_url=direct_url)
    t0 = time.monotonic()
    try:
        info = inspect(r.conn, migrations, target, allow_out_of_order)
        r.version_before = info["current"]
        _refuse(r, info)
        r.check_nontx_route([(m.version, m.filename) for m in info["pending"] if not m.transactional],
                            records=info["records"])
        base = {"changed": False, "applied": [], "pending": [], "above_target": info["above_target"],
                "version_before": info["current"], "version_after": info["current"], "run_id": r.run_id,
                "target": r.target, "target_version": info["target"], "drift": [], "lock": None}
        if not info["pending"]:
            base["msg"] = "%s is at %s: nothing to apply (target %s)" % (
                r.target, info["current"] or "no version", info["target"] or "none")
            return base
        r.take_lease()
        info = inspect(r.conn, migrations, target, allow_out_of_order)
        r.version_before = info["current"]
        _refuse(r, info)
        r.check_nontx_route([(m.version, m.filename) for m in info["pending"] if not m.transactional])
        for m in info["pending"]:
            if r.lease.lost is not None:
                raise LedgerError("this run lost its lease on %s (now held by: %s): stopped before %s"
                                  % (r.target, r.lease.lost, m.filename), target=r.target,
                                  applied=[d["version"] for d in r.done])
            if m.transactional:
                rec = _apply_tx(r, m)
            else:
                rec = _apply_nontx(r, m)
            r.done.append(rec)
        base.update({
            "changed": bool(r.done), "applied": r.done, "version_before": r.version_before,
            "version_after": r.done[-1]["version"] if r.done else info["current"],
            "lock": {"waited_s": r.lease.waited_s, "takeover": r.lease.takeover},
            "duration_ms": _ms(t0),
        })
        if r.done:
            base["msg"] = "applied %s to %s in %d ms (now at %s)" % (
                ", ".join(d["filename"] for d in r.done), r.target, base["duration_ms"], base["version_after"])
            if r.lease.waited_s >= 0.5:
                base["msg"] += "; waited %.1f s for the lease" % r.lease.waited_s
        else:
            base["msg"] = "%s is at %s: nothing to apply (another run applied them while this one waited)" % (
                r.target, info["current"] or "no version")
        if r.lease.takeover:
            t = r.lease.takeover
            base["msg"] += ("; took over the expired lease of run %s by %s (taken %ss ago, expired %ss ago)"
                            % (t["run_id"], t["holder"], t["age_s"], -t["expires_in_s"]))
        return base
    finally:
        r.close()


def _next_after_failure(r, filename, line, err=None, lost=False):
    """The next command after a failed migration: what to fix, then re-run, or how to go back."""
    rerun = "ansible-playbook playbooks/migrate.yml -l %s" % r.limit
    last_good = r.done[-1]["version"] if r.done else r.version_before
    code = (err or {}).get("sqlstate")
    if lost:
        first = ("find out why the connection to the target dropped (server restart, pg_terminate_backend, network);"
                 " the server rolled the migration back; then re-run `%s`" % rerun)
    elif code in RETRIABLE:
        first = ("end or wait out the session(s) holding the lock (see 'likely blocker'), or raise"
                 " migrate_lock_timeout / migrate_lock_retries; then re-run `%s`" % rerun)
    elif code == "57014":
        first = ("raise migrate_statement_timeout (e.g. -e migrate_statement_timeout=30min) or make %s faster;"
                 " then re-run `%s`" % (filename, rerun))
    else:
        first = "fix %s%s and re-run `%s`" % (filename, " (line %s)" % line if line else "", rerun)
    if r.done:
        back = r.version_before or "base"
        return ("%s; or undo what this run applied with `ansible-playbook playbooks/rollback.yml -l %s"
                " -e rollback_to=%s`" % (first, r.limit, back))
    return ("%s; the target stays at %s (to go back further: `ansible-playbook playbooks/rollback.yml -l %s"
            " -e rollback_to=VERSION|base`)" % (first, last_good or "no version", r.limit))


def _refuse(r, info):
    problems = plan_problems(info)
    if not problems:
        return
    drift = info["drift"]
    if drift:
        nxt = ("restore the applied file(s) as they were, or accept an intended edit or rename with "
               "`ansible-playbook playbooks/accept_checksum.yml -l %s -e migrate_accept_version=%s`"
               " (roles/migrate/README.md); `ansible-playbook playbooks/status.yml -l %s` shows the drift"
               % (r.limit, drift[0]["version"], r.limit))
    elif info["out_of_order"]:
        nxt = ("renumber the file(s) above %s, or allow it with -e migrate_allow_out_of_order=true"
               % info["current"])
    else:
        nxt = "choose a target among the set's versions (ansible-playbook playbooks/status.yml -l %s)" % r.limit
    msg = "refusing to %s on %s before any change:\n  - %s\n  next: %s" % (
        r.action, r.target, "\n  - ".join(problems), nxt)
    if info["records"]:
        r.event(r.action, "refused", None, None, {"problems": problems, "drift": drift})
    raise LedgerError(msg, target=r.target, drift=drift, out_of_order=info["out_of_order"],
                      next_command=nxt, problems=problems)


def _history_insert(cur, r, m, ms, kind="apply"):
    cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_at, applied_by, execution_ms,"
                " run_id, kind) VALUES (%s, %s, %s, clock_timestamp(), %s, %s, %s, %s)",
                (m.version, m.name, m.checksum, actor(), ms, r.run_id, kind))


def _apply_tx(r, m):
    t0 = r.t_step = time.monotonic()

    def finish(cur, ms):
        cur.execute("SELECT 1 FROM migrations.history WHERE version = %s", (m.version,))
        if cur.fetchone():
            raise LedgerError("%s was recorded by another run meanwhile: stopped" % m.version, target=r.target)
        _history_insert(cur, r, m, ms)
        log_event(cur, r.run_id, "apply", "ok", m.version, ms,
                  {"filename": m.filename, "checksum": m.checksum, "statements": len(m.statements),
                   "lease": r.lease.token if r.lease is not None else None})

    def once():
        del r.conn.notices[:]
        return _run_in_tx(r.conn, r.lease, r.s, m.statements, finish)

    try:
        ms, attempts = r.with_retries("apply", m.version, m.filename, once)
    except _StepFailed as exc:
        if exc.lost:
            r.reconnect()
        nxt = _next_after_failure(r, m.filename, _err_line(exc.stmt, exc.err) if exc.stmt else None, exc.err,
                                  exc.lost)
        raise r.fail(m.version, m.filename, m.path, exc, "migration",
                     advice="the migration was rolled back (one transaction: nothing of %s is applied)" % m.filename,
                     next_command=nxt)
    except _CommitUnknown as exc:
        r.reconnect()
        if _recorded(r, m.version):
            return {"version": m.version, "name": m.name, "filename": m.filename, "execution_ms": None,
                    "attempts": 1, "transactional": True, "note": "commit confirmed after a lost connection"}
        fake = _StepFailed(exc.err, None)
        raise r.fail(m.version, m.filename, m.path, fake, "migration (commit)",
                     advice="the connection was lost during COMMIT and the history has no row: not applied",
                     next_command=_next_after_failure(r, m.filename, None))
    notices = [n.strip() for n in r.conn.notices][-20:]
    return {"version": m.version, "name": m.name, "filename": m.filename, "execution_ms": ms,
            "attempts": attempts, "transactional": True, "duration_ms": _ms(t0), "notices": notices}


def _recorded(r, version):
    """Whether THIS runner committed ``version`` (after a connection lost during COMMIT).

    The run id alone can't tell: every host of one playbook run shares it. The apply
    event, committed in the same transaction as the history row, carries this
    runner's lease token.
    """
    token = r.lease.token if r.lease is not None else None
    try:
        with r.conn.cursor() as cur:
            cur.execute("SELECT EXISTS (SELECT 1 FROM migrations.history WHERE version = %s AND run_id = %s)"
                        " AND EXISTS (SELECT 1 FROM migrations.events WHERE action = 'apply' AND outcome = 'ok'"
                        "             AND version = %s AND run_id = %s AND detail->>'lease' = %s)",
                        (version, r.run_id, version, r.run_id, token))
            return bool(cur.fetchone()[0])
    except psycopg2.Error:
        return False


def _apply_nontx(r, m):
    """A ``-- ledger:no-transaction`` migration: statements in autocommit, then its record in one transaction."""
    t0 = r.t_step = time.monotonic()
    left = [i for i in invalid_indexes(r.conn) if _named_in(m.statements, i["index"])]
    if left:
        cleanup = "\n    ".join(i["cleanup"] for i in left)
        msg = ("refusing to run %s on %s: INVALID index(es) named in the file exist, left by an earlier failed"
               " or killed CONCURRENTLY build: %s. Drop them first (they are not used by queries):\n    %s\n"
               "  next: run the cleanup SQL above, then `ansible-playbook playbooks/migrate.yml -l %s`"
               % (m.filename, r.target, ", ".join("%s.%s" % (i["schema"], i["index"]) for i in left), cleanup,
                  r.limit))
        r.event("apply", "refused", m.version, None, {"filename": m.filename, "invalid_indexes": left})
        raise LedgerError(msg, target=r.target, version=m.version, file=m.filename, file_path=m.path,
                          invalid_indexes=left, cleanup_sql=cleanup, next_command="run the cleanup SQL, then re-run",
                          applied=[d["version"] for d in r.done])
    before = set((i["schema"], i["index"]) for i in invalid_indexes(r.conn))
    done_lines = []
    # A connection of its own (direct_url, else the database URL, never a pooler: see
    # check_nontx_route): session-level timeouts, then RESET ALL and closed after the file.
    nconn = r.nontx_conn()
    try:
        with nconn.cursor() as cur:
            _set_local(cur, r.s, local=False)
        t1 = time.monotonic()
        for stmt in m.statements:
            def once(stmt=stmt):
                try:
                    with nconn.cursor() as cur:
                        cur.execute(stmt.text)
                except psycopg2.Error as exc:
                    lost = exc.pgcode is None or bool(nconn.closed)
                    # A CONCURRENTLY build that timed out late leaves an INVALID index: never retry over it.
                    left = not lost and any((i["schema"], i["index"]) not in before
                                            for i in invalid_indexes(r.conn))
                    raise _StepFailed(_one_line(pg_error(exc)), stmt, lost=lost, no_retry=left)
            try:
                _, attempts = r.with_retries("apply", m.version, m.filename, once)
            except _StepFailed as exc:
                if exc.lost:
                    r.reconnect()
                new = [i for i in invalid_indexes(r.conn) if (i["schema"], i["index"]) not in before]
                cleanup = "\n".join(i["cleanup"] for i in new)
                advice = ("%s runs outside a transaction (-- ledger:no-transaction): the statement(s) before"
                          " it (line(s) %s) were applied and stay" % (
                              m.filename, ", ".join(str(x) for x in done_lines) or "none"))
                if new:
                    advice += ("\n  it left INVALID index(es) %s; clean up with:\n    %s" % (
                        ", ".join("%s.%s" % (i["schema"], i["index"]) for i in new),
                        "\n    ".join(i["cleanup"] for i in new)))
                advice += ("\n  no history row was recorded: a re-run runs the whole file again (keep it re-runnable:"
                           " CREATE INDEX CONCURRENTLY IF NOT EXISTS ...)")
                nxt = _next_after_failure(r, m.filename, _err_line(exc.stmt, exc.err), exc.err, exc.lost)
                if new:
                    nxt = "run the cleanup SQL (%s), then %s" % (" ".join(i["cleanup"] for i in new), nxt)
                raise r.fail(m.version, m.filename, m.path, exc, "non-transactional migration",
                             extra={"invalid_indexes": new, "cleanup_sql": cleanup or None,
                                    "statements_applied": done_lines, "transactional": False},
                             advice=advice, next_command=nxt)
            done_lines.append(stmt.line)
        notices = [n.strip() for n in nconn.notices][-20:]
    finally:
        _reset_session(nconn)
        if not nconn.closed:
            nconn.close()
    ms = _ms(t1)

    def finish(cur, _ms_unused):
        _history_insert(cur, r, m, ms)
        log_event(cur, r.run_id, "apply", "ok", m.version, ms,
                  {"filename": m.filename, "checksum": m.checksum, "statements": len(m.statements),
                   "transactional": False, "lease": r.lease.token if r.lease is not None else None})

    try:
        r.with_retries("record", m.version, m.filename, lambda: _run_in_tx(r.conn, r.lease, r.s, [], finish))
    except _StepFailed as exc:
        raise r.fail(m.version, m.filename, m.path, exc, "recording",
                     advice="its statements were applied but its history row could not be written; re-running"
                            " runs the (re-runnable) file again",
                     next_command="ansible-playbook playbooks/migrate.yml -l %s" % r.limit)
    return {"version": m.version, "name": m.name, "filename": m.filename, "execution_ms": ms, "attempts": 1,
            "transactional": False, "duration_ms": _ms(t0), "notices": notices}


# =========================================================================== revert

def revert_plan(applied, migrations, to_version):
    """([(version, down tuple or None)], missing versions) of a revert down to ``to_version`` ('base' = all)."""
    if to_version in (None, ""):
        raise LedgerError("rollback_to is required: a version (e.g. 0009) or base")
    to_version = str(to_version)
    if to_version != "base" and not VERSION_RE.match(to_version):
        raise LedgerError("rollback_to must be a 4-digit version or base (got %r)" % to_version)
    floor = "" if to_version == "base" else to_version
    steps = []
    missing = []
    for row in sorted(applied, key=lambda x: x["version"], reverse=True):
        if row["version"] <= floor:
            continue
        down = migrations.down_for(row["version"]) if hasattr(migrations, "down_for") else None
        steps.append((row["version"], row, down))
        if down is None:
            missing.append(row["version"])
    return steps, missing


def revert(url, migrations, to_version, run_id=None, limit=None, check=False, lock_timeout=None,
           statement_timeout=None, lock_retries=None, retry_backoff=None, lock_wait=None, lock_ttl=None,
           connection_check=None, direct_url=None, **_ignored):
    """Revert the applied migrations above ``to_version`` ('base': all), newest first, with their down scripts.

    Refuses before any change when a needed ``.down.sql`` is missing (naming them,
    offering restore), when the up file of a migration to revert was edited or
    renamed since it was applied (its down script may not undo what was applied:
    accept_checksum or restore the file), and when a no-transaction down script would
    run through a pooler without ``direct_url`` (as apply()). The plan is computed
    again under the lease, with the same refusals. Each revert is one transaction holding the down script's
    statements, the DELETE of its history row and its ``revert`` event, under the
    lease, the timeouts and the retries of apply(). ``check=True`` rehearses the
    down scripts, newest first, in one rolled-back transaction and writes nothing.

    Returns {changed, reverted: [{version, filename, execution_ms}], version_before,
    version_after, rehearsal (check), run_id, target, msg}; raises LedgerError.
    """
    s = _settings({"lock_timeout": lock_timeout, "statement_timeout": statement_timeout,
                   "lock_retries": lock_retries, "retry_backoff": retry_backoff, "lock_wait": lock_wait,
                   "lock_ttl": lock_ttl, "connection_check": connection_check})
    r = _Runner(url, migrations, run_id, s, limit, "revert", direct_url=direct_url)
    t0 = time.monotonic()
    try:
        with r.conn.cursor() as cur:
            applied = read_history(cur) or []
        r.version_before = applied[-1]["version"] if applied else None
        steps = _revert_refusals(r, applied, migrations, to_version, check)
        base = {"changed": False, "reverted": [], "version_before": r.version_before,
                "version_after": r.version_before, "run_id": r.run_id, "target": r.target,
                "to_version": str(to_version), "plan": [v for v, _, _ in steps]}
        if not steps:
            base["msg"] = "%s is at %s: nothing to revert down to %s" % (r.target, r.version_before or "no version",
                                                                       to_version)
            return base
        if check:
            pseudo = [_DownAsMigration(v, d) for v, _, d in steps]
            results = rehearse(url, pseudo, lock_timeout=s["lock_timeout"], statement_timeout=s["statement_timeout"],
                               lock_retries=s["lock_retries"], retry_backoff=s["retry_backoff"], conn=r.conn)
            base.update({"changed": True, "rehearsal": results,
                         "version_after": _floor_version(applied, to_version)})
            failed = [x for x in results if x["status"] == "would_fail"]
            base["msg"] = "would revert %s on %s: %s" % (", ".join(v for v, _, _ in steps), r.target,
                                                         "; ".join(format_rehearsal(results)))
            if failed:
                f = failed[0]
                raise LedgerError("the revert rehearsal on %s: %s would fail at line %s: SQLSTATE %s: %s"
                                  % (r.target, f["filename"], f["line"], f["sqlstate"], f["message"]),
                                  target=r.target, rehearsal=results, file=f["filename"], line=f["line"],
                                  sqlstate=f["sqlstate"], message=f["message"], hint=f.get("hint"),
                                  next_command="fix %s and re-run the rehearsal" % f["filename"])
            return base
        r.take_lease()
        # The history may have changed while this run waited for the lease: plan (and refuse) again.
        with r.conn.cursor() as cur:
            applied = read_history(cur) or []
        r.version_before = applied[-1]["version"] if applied else None
        steps = _revert_refusals(r, applied, migrations, to_version, check, under_lease=True)
        for version, row, down in steps:
            r.done.append(_revert_one(r, version, row, down))
        base.update({"changed": bool(r.done), "reverted": r.done, "version_before": r.version_before,
                     "version_after": _floor_version(applied, to_version), "duration_ms": _ms(t0),
                     "plan": [v for v, _, _ in steps]})
        if r.done:
            base["msg"] = "reverted %s on %s (now at %s)" % (", ".join(d["version"] for d in r.done), r.target,
                                                             base["version_after"] or "no version")
        else:
            base["msg"] = "%s is at %s: nothing to revert down to %s (another run reverted them meanwhile)" % (
                r.target, r.version_before or "no version", to_version)
        return base
    finally:
        r.close()


def nontx_route_problem(url, pending, direct_url=None, limit=None, action="apply"):
    """Read-only: the LedgerError a real run would raise for the no-transaction files of ``pending``
    (Migration objects) through a pooler without ``direct_url``, or None. For rehearsals (--check)."""
    files = [(m.version, m.filename) for m in pending if not m.transactional]
    if not files:
        return None
    r = _Runner(url, pending, "rehearsal", _settings({}), limit, action, direct_url=direct_url)
    try:
        r.check_nontx_route(files, records=False)
    except LedgerError as exc:
        return exc
    finally:
        r.conn.close()
    return None


def _revert_refusals(r, applied, migrations, to_version, check, under_lease=False):
    """The revert plan's steps; LedgerError (with a ``refused`` event on a real run) before any change when
    a down script is missing, an up file to revert drifted, or a no-transaction down script would run
    through a pooler without direct_url."""
    steps, missing = revert_plan(applied, migrations, to_version)
    when = " (found under the lease: the history changed while this run waited)" if under_lease else ""
    if missing:
        nxt = ("add the missing down script(s), or restore a backup: `ansible-playbook playbooks/rollback.yml"
               " -l %s -e rollback_mode=restore`" % r.limit)
        msg = ("refusing to revert %s to %s before any change: no down script for %s (expected %s)%s\n  next: %s"
               % (r.target, to_version, ", ".join(missing),
                  ", ".join("%s_<name>.down.sql" % v for v in missing), when, nxt))
        if not check and applied:
            r.event("revert", "refused", None, None, {"missing_down": missing, "to_version": str(to_version)})
        raise LedgerError(msg, target=r.target, missing_down=missing, next_command=nxt, reverted=[])
    plan_versions = set(v for v, _, _ in steps)
    drift = [d for d in _drift(applied, migrations or [])
             if d["version"] in plan_versions and d["kind"] in ("edited", "renamed")]
    if drift:
        nxt = ("restore the applied file(s) as they were applied, or, for an intended edit (the down script"
               " matches the edited file), accept it first: `ansible-playbook playbooks/accept_checksum.yml -l %s"
               " -e migrate_accept_version=%s`; then re-run the rollback" % (r.limit, drift[0]["version"]))
        msg = ("refusing to revert %s to %s before any change: the up file of a migration to revert changed since"
               " it was applied, so its down script may not undo what was applied:\n  - %s%s\n  next: %s"
               % (r.target, to_version, "\n  - ".join(d["message"] for d in drift), when, nxt))
        if not check and applied:
            r.event("revert", "refused", None, None, {"drift": drift, "to_version": str(to_version)})
        raise LedgerError(msg, target=r.target, drift=drift, next_command=nxt, reverted=[])
    r.check_nontx_route([(v, d[1]) for v, _, d in steps if not d[2]], records=bool(applied) and not check)
    return steps


def _floor_version(applied, to_version):
    below = [a["version"] for a in applied if to_version != "base" and a["version"] <= str(to_version)]
    return below[-1] if below else None


class _DownAsMigration(object):
    """Adapter so rehearse() can run a down script."""

    def __init__(self, version, down):
        self.version = version
        self.path, self.filename, self.transactional, self.statements = down


def _revert_one(r, version, row, down):
    path, filename, transactional, statements = down
    t0 = r.t_step = time.monotonic()

    def finish(cur, ms):
        cur.execute("DELETE FROM migrations.history WHERE version = %s", (version,))
        if cur.rowcount != 1:
            raise LedgerError("%s is no longer in migrations.history (reverted by another run?)" % version,
                              target=r.target)
        log_event(cur, r.run_id, "revert", "ok", version, ms, {"filename": filename, "name": row["name"]})

    nxt = ("fix %s and re-run the rollback, or restore a backup: `ansible-playbook playbooks/rollback.yml -l %s"
           " -e rollback_mode=restore`" % (filename, r.limit))
    if transactional:
        try:
            ms, attempts = r.with_retries("revert", version, filename,
                                          lambda: _run_in_tx(r.conn, r.lease, r.s, statements, finish))
        except _StepFailed as exc:
            if exc.lost:
                r.reconnect()
            raise r.fail(version, filename, path, exc, "revert",
                         advice="this revert was rolled back: %s is still applied" % version, next_command=nxt)
        except _CommitUnknown as exc:
            r.reconnect()
            raise r.fail(version, filename, path, _StepFailed(exc.err, None), "revert (commit)", next_command=nxt)
    else:
        nconn = r.nontx_conn()  # of its own (direct_url, else the URL; never a pooler): reset and closed after
        try:
            with nconn.cursor() as cur:
                _set_local(cur, r.s, local=False)
            t1 = time.monotonic()
            for stmt in statements:
                try:
                    r.with_retries("revert", version, filename,
                                   lambda stmt=stmt: _run_statements(nconn.cursor(), [stmt]))
                except _StepFailed as exc:
                    if exc.lost:
                        r.reconnect()
                    raise r.fail(version, filename, path, exc, "non-transactional revert",
                                 extra={"invalid_indexes": invalid_indexes(r.conn)}, next_command=nxt)
        finally:
            _reset_session(nconn)
            if not nconn.closed:
                nconn.close()
        ms = _ms(t1)
        attempts = 1
        try:
            r.with_retries("revert", version, filename,
                           lambda: _run_in_tx(r.conn, r.lease, r.s, [], lambda cur, _x: finish(cur, ms)))
        except _StepFailed as exc:
            raise r.fail(version, filename, path, exc, "revert (record)", next_command=nxt)
    return {"version": version, "filename": filename, "execution_ms": ms, "attempts": attempts,
            "duration_ms": _ms(t0)}


# =========================================================================== baseline, accept, status

def baseline(url, migrations, version, run_id=None, limit=None, check=False, lock_wait=None, lock_ttl=None,
             **_ignored):
    """Record an existing database as already at ``version`` without running any file.

    For a database migrated by hand with the runbook: every migration of the set up
    to ``version`` that is not recorded gets a history row (kind 'baseline',
    execution_ms 0, the file's current checksum) and one ``baseline`` event, in one
    transaction under the lease. Refuses when a version above ``version`` is
    already recorded or ``version`` is not in the set. ``check=True`` only reports.
    """
    s = _settings({"lock_wait": lock_wait, "lock_ttl": lock_ttl})
    version = str(version or "")
    if not VERSION_RE.match(version):
        raise LedgerError("baseline_version must be a 4-digit version (got %r)" % version)
    by_version = dict((m.version, m) for m in migrations)
    if version not in by_version:
        raise LedgerError("baseline version %s is not in the migration set (%s)"
                          % (version, ", ".join(by_version) or "empty"))
    r = _Runner(url, migrations, run_id, s, limit, "baseline")
    try:
        info = inspect(r.conn, migrations)
        above = [a["version"] for a in info["applied"] if a["version"] > version]
        if above:
            raise LedgerError("refusing to baseline %s at %s: %s already recorded above it"
                              % (r.target, version, ", ".join(above)), target=r.target)
        if info["drift"]:
            _refuse(r, info)
        todo = [m for m in migrations if m.version <= version
                and m.version not in set(a["version"] for a in info["applied"])]
        result = {"changed": bool(todo), "baselined": [m.version for m in todo], "run_id": r.run_id,
                  "target": r.target, "version_before": info["current"],
                  "version_after": version if todo else info["current"], "warnings": []}
        if not todo:
            result["msg"] = "%s already records every version up to %s" % (r.target, version)
            return result
        # A file that would still apply cleanly here suggests its objects are missing: say so.
        applies = _applies_cleanly(r.conn, todo, s)
        if applies:
            result["warnings"].append(
                "%s would apply cleanly on this database (rehearsed, rolled back): are its objects really there?"
                " Baseline only versions the database is already at" % ", ".join(applies))
        if check:
            result["msg"] = "would record %s as applied (baseline, nothing run) on %s" % (
                ", ".join(m.version for m in todo), r.target)
            if result["warnings"]:
                result["msg"] += "; warning: " + result["warnings"][0]
            return result
        r.take_lease()

        def finish(cur, _ms_unused):
            for m in todo:
                cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms,"
                            " run_id, kind) VALUES (%s, %s, %s, %s, 0, %s, 'baseline')",
                            (m.version, m.name, m.checksum, actor(), r.run_id))
            log_event(cur, r.run_id, "baseline", "ok", version, 0,
                      {"versions": [m.version for m in todo],
                       "checksums": dict((m.version, m.checksum) for m in todo)})

        try:
            r.with_retries("baseline", version, None, lambda: _run_in_tx(r.conn, r.lease, r.s, [], finish))
        except _StepFailed as exc:
            raise LedgerError("baseline of %s failed: %s" % (r.target, exc.err.get("message")),
                              target=r.target, sqlstate=exc.err.get("sqlstate"))
        result["msg"] = "recorded %s as applied on %s (baseline: no file was run)" % (
            ", ".join(m.version for m in todo), r.target)
        if result["warnings"]:
            result["msg"] += "; warning: " + result["warnings"][0]
        return result
    finally:
        r.close()


def _applies_cleanly(conn, migrations, s):
    """Versions whose file runs without error here, each alone in a rolled-back savepoint (nothing written)."""
    clean = []
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            _set_local(cur, s)
            for m in migrations:
                cur.execute("SAVEPOINT ledger_baseline_probe")
                try:
                    for stmt in m.statements:
                        text, _note = rehearsal_form(stmt)
                        if text is not None:
                            cur.execute(text)
                    clean.append(m.version)
                except psycopg2.Error:
                    pass
                cur.execute("ROLLBACK TO SAVEPOINT ledger_baseline_probe")
    except psycopg2.Error:
        pass
    finally:
        _safe_rollback(conn)
        if not conn.closed:
            conn.autocommit = True
    return clean


def accept_checksum(url, migrations, version, run_id=None, limit=None, check=False, lock_wait=None, lock_ttl=None,
                    **_ignored):
    """Accept an intended edit (or rename) of an applied migration: record the file's checksum and name.

    The file is NOT run again. One transaction under the lease updates the history
    row and appends an ``accept_checksum`` event with both checksums. Refuses when
    the version is not applied, has no file in the set, or has no drift.
    """
    s = _settings({"lock_wait": lock_wait, "lock_ttl": lock_ttl})
    version = str(version or "")
    if not VERSION_RE.match(version):
        raise LedgerError("accept_version must be a 4-digit version (got %r)" % version)
    r = _Runner(url, migrations, run_id, s, limit, "accept_checksum")
    try:
        info = inspect(r.conn, migrations)
        row = dict((a["version"], a) for a in info["applied"]).get(version)
        if row is None:
            raise LedgerError("%s is not applied on %s: nothing to accept" % (version, r.target), target=r.target)
        m = dict((x.version, x) for x in migrations).get(version)
        if m is None:
            raise LedgerError("%s has no file in the set: restore the file (accepting a deletion is not possible;"
                              " revert it instead)" % version, target=r.target)
        result = {"changed": False, "run_id": r.run_id, "target": r.target, "version": version,
                  "old_checksum": row["checksum"], "new_checksum": m.checksum, "old_name": row["name"],
                  "new_name": m.name}
        if row["checksum"] == m.checksum and row["name"] == m.name:
            result["msg"] = "%s: the recorded checksum already matches %s" % (version, m.filename)
            return result
        result["changed"] = True
        if check:
            result["msg"] = "would record checksum %s for %s (was %s)" % (m.checksum, m.filename, row["checksum"])
            return result
        r.take_lease()

        def finish(cur, _ms_unused):
            cur.execute("UPDATE migrations.history SET checksum = %s, name = %s WHERE version = %s",
                        (m.checksum, m.name, version))
            log_event(cur, r.run_id, "accept_checksum", "ok", version, 0,
                      {"filename": m.filename, "old_checksum": row["checksum"], "new_checksum": m.checksum,
                       "old_name": row["name"], "new_name": m.name})

        r.with_retries("accept_checksum", version, m.filename, lambda: _run_in_tx(r.conn, r.lease, r.s, [], finish))
        result["msg"] = "recorded checksum %s for %s (was %s); the file was not run again" % (
            m.checksum, m.filename, row["checksum"])
        return result
    finally:
        r.close()


def status(url, migrations, target=None, allow_out_of_order=False):
    """Read-only report: applied (when, by whom, how long), pending, drift, out-of-order, lease.

    Returns the inspect() dict with Migration objects turned into dicts, plus
    ``lines`` (human-readable) and ``lease`` (the current holder, or None).
    """
    conn = connect(url, autocommit=True)
    try:
        info = inspect(conn, migrations, target, allow_out_of_order)
        lease = None
        if info["records"]:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('migrations.lock') IS NOT NULL")
                if cur.fetchone()[0]:
                    lease = Lease(url, conn, "status")._read(cur)
    finally:
        conn.close()
    target_name = describe_target(url)
    lines = ["%s: at %s (target %s): %d applied, %d pending, %s" % (
        target_name, info["current"] or "no version", info["target"] or "none", len(info["applied"]),
        len(info["pending"]), "%d DRIFTED" % len(info["drift"]) if info["drift"] else "no drift")]
    for a in info["applied"]:
        when = (a["applied_at"] or "")[:19].replace("T", " ")
        lines.append("applied  %s %-32s %s UTC by %s in %s ms%s" % (
            a["version"], a["name"], when, a["applied_by"], a["execution_ms"],
            " (baseline)" if a["kind"] == "baseline" else ""))
    for m in info["pending"]:
        lines.append("pending  %s%s" % (m.filename, "" if m.transactional else " (no-transaction)"))
    for v in info["above_target"]:
        lines.append("above target %s" % v)
    for d in info["drift"]:
        lines.append("DRIFT    %s %s: %s" % (d["version"], d["kind"], d["message"]))
    for o in info["out_of_order"]:
        lines.append("ORDER    %s" % o["message"])
    if info["target_problem"]:
        lines.append("TARGET   %s" % info["target_problem"])
    if lease:
        lines.append("lease    held by run %s (%s), taken %ss ago, expires in %ss" % (
            lease["run_id"], lease["holder"], lease["age_s"], lease["expires_in_s"]))
    out = dict(info)
    out["pending"] = [m.to_dict() for m in info["pending"]]
    out["lease"] = lease
    out["lines"] = lines
    out["target_name"] = target_name
    return out


def to_json(obj):
    """JSON-safe copy of an engine result (Migration objects become dicts)."""
    return json.loads(json.dumps(obj, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))
