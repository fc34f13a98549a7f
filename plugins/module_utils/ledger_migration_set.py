# -*- coding: utf-8 -*-
"""The migration set: the one file-name rule, checksums, directives and down scripts.

``NNNN_name.sql`` (up) with an optional ``NNNN_name.down.sql`` (revert). The engine,
precheck and promotion all read a directory through load_migration_set() and ask
file names through parse_filename(): one rule, one home.
"""

from __future__ import annotations

import hashlib
import os
import re

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
)


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import (
    SqlSyntaxError,
    TX_CONTROL,
    needs_no_transaction,
    session_setting,
    split_sql,
)

VERSION_RE = re.compile(r"^[0-9]{4}$")
UP_RE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[A-Za-z0-9][A-Za-z0-9_]*)\.sql$")
DOWN_RE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[A-Za-z0-9][A-Za-z0-9_]*)\.down\.sql$")
DIRECTIVE_RE = re.compile(r"^--\s*ledger:(?P<name>[A-Za-z0-9_-]*)(?P<arg>.*)$")
KNOWN_DIRECTIVES = ("no-transaction", "allow-lock")
NO_TRANSACTION = "no-transaction"
# "-- ledger:allow-lock schema.table": the lock impact on that table is intended (issue 14).
ALLOW_LOCK = "allow-lock"
QUALIFIED_TABLE = re.compile(r'^(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)\.(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)$')


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
        self.allow_lock = ()

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
    """The names of the ``-- ledger:...`` directives of a file's header (comments before its first statement)."""
    return [name for name, _arg in header_directives(text, filename)]


def allow_lock_tables(text, filename):
    """The tables of a file's ``-- ledger:allow-lock schema.table`` header lines (one table a line)."""
    return tuple(arg.replace('"', "") for name, arg in header_directives(text, filename) if name == ALLOW_LOCK)


def header_directives(text, filename):
    """[(name, argument)] of the ``-- ledger:...`` directives of a file's header, validated."""
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
                arg = m.group("arg").strip()
                if name == ALLOW_LOCK and not QUALIFIED_TABLE.match(arg):
                    raise LedgerError("%s line %d: 'ledger:allow-lock' takes one schema-qualified table per line"
                                      " ('-- ledger:allow-lock public.accounts'), not %r" % (filename, lineno, arg),
                                      file=filename, line=lineno)
                found.append((name, arg))
            continue
        in_header = False
    return found


# Bytes that must not reach libpq: it ends a query string at a NUL (running half a statement), and
# the other control characters are invisible in an editor and in a review. Tab, LF and CR are text.
# A quoted identifier in a masked statement (its strings, comments and bodies are blanked, so
# every double quote left delimits one).
QUOTED_IDENT = re.compile(r'"(?:[^"]|"")*"')


def _meta_command_at(st):
    """Offset of a psql meta-command's backslash in a statement, or -1 (one inside "a quoted name" is a name)."""
    if "\\" not in st.masked:
        return -1
    return QUOTED_IDENT.sub(lambda m: " " * len(m.group(0)), st.masked).find("\\")


CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")


def _checked_text(text, filename):
    """The file's text without a leading byte-order mark; a control character (or a BOM further on) refused.

    A leading BOM is dropped before anything reads the text, so that it can never hide a BEGIN or a
    COMMIT from the transaction-control check (the checksum stays the file's bytes).
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    bad = CONTROL_CHARS.search(text)
    if bad:
        ln = text.count("\n", 0, bad.start()) + 1
        ch = bad.group()
        what = "a byte-order mark (U+FEFF) after the start" if ch == "\ufeff" else "the control character 0x%02X%s" % (
            ord(ch), " (NUL: libpq would stop reading the statement there and run only its first part)"
            if ch == "\x00" else "")
        raise LedgerError("%s line %d: %s; only tab, LF and CR are allowed in a migration: remove it"
                          % (filename, ln, what), file=filename, line=ln)
    return text


def _parse_file(path, filename):
    """(bytes, text, transactional, statements) of one SQL file, validated."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LedgerError("%s is not UTF-8 (%s)" % (filename, exc), file=filename)
    text = _checked_text(text, filename)
    transactional = NO_TRANSACTION not in parse_directives(text, filename)
    allow_lock = allow_lock_tables(text, filename)
    try:
        statements = split_sql(text)
    except SqlSyntaxError as exc:
        raise LedgerError("%s line %d: %s" % (filename, exc.line, exc), file=filename, line=exc.line)
    if not statements:
        raise LedgerError("%s contains no SQL statement" % filename, file=filename)
    for st in statements:
        meta = _meta_command_at(st)
        if meta >= 0:
            ln = st.line_at(meta + 1)
            raise LedgerError("%s line %d: psql meta-commands (\\...) are not SQL; the engine runs SQL only"
                              % (filename, ln), file=filename, line=ln)
        if TX_CONTROL.match(st.masked):
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
    return raw, text, transactional, statements, allow_lock


BAD_NAME = ("%s: a migration file is named NNNN_name.sql (4-digit version, then letters, digits or _), or"
            " NNNN_name.down.sql for its revert; rename or remove it")


def parse_filename(filename):
    """The one file-name rule: ("up" | "down", version, name) of a migration file name, else None.

    ``*.down.sql`` is never an up migration; ``0012_add-index.sql`` is no migration name (a "-").
    """
    m = DOWN_RE.match(filename)
    if m:
        return "down", m.group("version"), m.group("name")
    m = UP_RE.match(filename)
    if m:
        return "up", m.group("version"), m.group("name")
    return None


def sql_files(directory):
    """[(filename, path)] of the ``*.sql`` files of a migration directory (hidden files and others left out)."""
    out = []
    for filename in sorted(os.listdir(directory)):
        path = os.path.join(directory, filename)
        if filename.lower().endswith(".sql") and not filename.startswith(".") and os.path.isfile(path):
            out.append((filename, path))
    return out


def file_sha256(path):
    """sha256 hex of a file's bytes (the checksum migrations.history records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def up_files(directory, up_to=None):
    """[(version, filename, sha256)] of the up migrations (up to a version), in order, by the one rule.

    A ``*.sql`` file outside the rule is refused, as load_migration_set() does, without reading any
    file's statements (promotion stamps hash the set, they don't run it).
    """
    if not os.path.isdir(directory):
        raise LedgerError("migrations_dir %s is not a directory" % directory)
    out = []
    for filename, path in sql_files(directory):
        parsed = parse_filename(filename)
        if parsed is None:
            raise LedgerError(BAD_NAME % filename, file=filename)
        kind, version, _name = parsed
        if kind == "up" and (not up_to or version <= up_to):
            out.append((version, filename, file_sha256(path)))
    return out


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
    for filename, path in sql_files(directory):
        parsed = parse_filename(filename)
        if parsed is None:
            raise LedgerError(BAD_NAME % filename, file=filename)
        kind, version, name = parsed
        if kind == "down":
            if version in downs:
                raise LedgerError("duplicate down scripts for version %s: %s and %s"
                                  % (version, downs[version][2], filename), file=filename)
            downs[version] = (name, path, filename)
            continue
        if version in ups:
            raise LedgerError("duplicate version %s: %s and %s (each version appears once; renumber one)"
                              % (version, ups[version][2], filename), file=filename)
        ups[version] = (name, path, filename)

    migrations = []
    for version in sorted(ups):
        name, path, filename = ups[version]
        raw, text, transactional, statements, allow_lock = _parse_file(path, filename)
        mig = Migration(version, name, filename, path, hashlib.sha256(raw).hexdigest(), text, transactional,
                        statements)
        mig.allow_lock = allow_lock
        if version in downs:
            dname, dpath, dfilename = downs.pop(version)
            if dname != name:
                raise LedgerError("%s does not match its up migration %s (same NNNN_name expected)"
                                  % (dfilename, filename), file=dfilename)
            _unused, _unused, dtx, dstatements, _unused = _parse_file(dpath, dfilename)
            mig.down_path, mig.down_filename, mig.down_transactional, mig.down_statements = \
                dpath, dfilename, dtx, dstatements
        migrations.append(mig)
    orphans = {}
    for version, (dname, dpath, dfilename) in downs.items():
        _unused, _unused, dtx, dstatements, _unused = _parse_file(dpath, dfilename)
        orphans[version] = DownScript(version, dname, dfilename, dpath, dtx, dstatements)
    return MigrationSet(migrations, directory=directory, orphan_downs=orphans)
