# -*- coding: utf-8 -*-
"""SQL splitting: a migration file's text as statements with their file lines.

A small scanner that knows PostgreSQL's lexical rules (quotes, E'' strings, dollar
quoting, comments, nested block comments), so each statement keeps the line it
starts on (file:line in every failure) and psql meta-commands are refused; plus the
statement classifications the engine needs (session SETs, no-transaction commands,
the rehearsal form of a CONCURRENTLY statement).
"""

from __future__ import annotations

import bisect
import re


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
        # The head alone when it already fills the width: a statement may hold a long function body.
        one = " ".join(self.text[:2 * width].split())
        if len(one) <= width:
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
TX_CONTROL = re.compile(
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


_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_QUALIFIED = r"%s(?:\s*\.\s*%s)?" % (_NAME, _NAME)
_CREATE_INDEX_CONCURRENTLY = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(?!ON\b)(?P<index>%s)\s+ON\s+"
    r"(?:ONLY\s+)?(?P<table>%s)" % (_NAME, _QUALIFIED), re.IGNORECASE | re.DOTALL)
_DROP_INDEX_CONCURRENTLY = re.compile(
    r"^\s*DROP\s+INDEX\s+CONCURRENTLY\s+(?:IF\s+EXISTS\s+)?(?P<index>%s)\s*(?:CASCADE|RESTRICT)?\s*$" % _QUALIFIED,
    re.IGNORECASE | re.DOTALL)


def unquote_name(name):
    """An identifier as written to its catalog name: "Quoted" kept as is, a bare one folded to lower case."""
    name = name.strip()
    if name.startswith('"'):
        return name[1:-1].replace('""', '"')
    return name.lower()


def split_qualified(name):
    """(schema or None, name) of a possibly schema-qualified name as written, each as in the catalog."""
    parts = re.findall(_NAME, name)
    return (unquote_name(parts[0]), unquote_name(parts[1])) if len(parts) == 2 else (None, unquote_name(parts[0]))


def concurrent_index(stmt):
    """What a named CREATE/DROP INDEX CONCURRENTLY works on: {action, index, schema, table}, else None.

    For finding out, after its connection was lost, whether it completed: the index's name (as in the
    catalog) and, for CREATE, the table it is on as written (the index lives in that table's schema);
    for DROP, the schema when the name is qualified (``table`` None). An unnamed CREATE INDEX gets a
    name the server picks: None then.
    """
    m = _CREATE_INDEX_CONCURRENTLY.match(stmt.masked)
    if m:
        return {"action": "create", "index": unquote_name(m.group("index")), "schema": None,
                "table": m.group("table").strip()}
    m = _DROP_INDEX_CONCURRENTLY.match(stmt.masked)
    if m:
        schema, index = split_qualified(m.group("index"))
        return {"action": "drop", "index": index, "schema": schema, "table": None}
    return None
