# -*- coding: utf-8 -*-
"""Shared plumbing for the ledger modules: connections, redaction, errors, records.

Every module of this project talks to one target database through one libpq URL.
This file keeps the rules that must hold everywhere in one place:

* a password never leaves this process: URLs are redacted before they reach a
  message, a result, an event or a report;
* a PostgreSQL error becomes a dict (SQLSTATE, message, detail, hint, position)
  that the caller turns into an operator's message, never a traceback;
* the records of CONTRACT.md (`migrations.history`, `migrations.events`) are
  created the same way by every module that writes them.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import re
import socket
import time
import uuid

try:
    import psycopg2
    import psycopg2.extensions
    import psycopg2.extras
    HAS_PSYCOPG2 = True
    PSYCOPG2_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - reported by the module
    HAS_PSYCOPG2 = False
    PSYCOPG2_IMPORT_ERROR = _exc

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_errors import LedgerError  # noqa: F401
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target, target_name

APPLICATION_NAME = "ledger-migrations"
# The application_name of the run lease's short-lived connections (a waiter's polls, a restore's beats):
# a restore lets them be (each lasts milliseconds and holds nothing) instead of refusing or terminating them.
LEASE_APPLICATION = "ledger-migrations lease"

# The schema that holds the project's records. Never dropped by a revert of the set.
RECORDS_DDL = """
CREATE SCHEMA IF NOT EXISTS migrations;
COMMENT ON SCHEMA migrations IS 'Migration records of the ledger-migrations project (history, events, lock). Never dropped by a revert.';
CREATE TABLE IF NOT EXISTS migrations.history (
    version      text        PRIMARY KEY CHECK (version ~ '^[0-9]{4}$'),
    name         text        NOT NULL,
    checksum     text        NOT NULL CHECK (checksum ~ '^[0-9a-f]{64}$'),
    applied_at   timestamptz NOT NULL DEFAULT now(),
    applied_by   text        NOT NULL,
    execution_ms integer     NOT NULL CHECK (execution_ms >= 0),
    run_id       text        NOT NULL,
    kind         text        NOT NULL DEFAULT 'apply' CHECK (kind IN ('apply', 'baseline'))
);
CREATE TABLE IF NOT EXISTS migrations.events (
    id          bigserial   PRIMARY KEY,
    run_id      text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text        NOT NULL,
    action      text        NOT NULL,
    version     text,
    outcome     text        NOT NULL,
    duration_ms integer,
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS events_run_id_idx ON migrations.events (run_id);
-- The run lease: one row while a run holds the target (see the migrate role's README).
CREATE TABLE IF NOT EXISTS migrations.lock (
    id          integer     PRIMARY KEY CHECK (id = 1),
    run_id      text        NOT NULL,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
"""


# --------------------------------------------------------------------------- URLs

_URL_TOKEN = re.compile(r"postgres(?:ql)?://[^\s'\"]*", re.IGNORECASE)
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def _redact_url_token(match):
    """`scheme://user:secret@host/db` -> `scheme://user:********@host/db`.

    The user info ends at the LAST '@' of the URL: a password may itself hold
    an '@' (or anything else when it is not percent-encoded). Erring towards
    hiding too much (an '@' in the query) is the safe direction.
    """
    token = match.group(0)
    head, rest = token.split("://", 1)
    at = rest.rfind("@")
    if at < 0:
        return token
    userinfo, hostpart = rest[:at], rest[at + 1:]
    if ":" not in userinfo:
        return token
    return "%s://%s:********@%s" % (head, userinfo.split(":", 1)[0], hostpart)


def redact(text):
    """Remove passwords from any text that may contain a URL or a conninfo string."""
    if text is None:
        return text
    text = str(text)
    text = _URL_TOKEN.sub(_redact_url_token, text)
    text = _PASSWORD_KV.sub(r"\1********", text)
    return text


def describe_target(url):
    """`user@host:port/db`: how a target is named in every message (no password; see ledger_target)."""
    return target_name(url)


def url_with_database(url, dbname):
    """The same URL pointing at another database (used for scratch and restore databases)."""
    return Target(url).with_database(dbname).url


def connect(url, autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME):
    """Open a connection with a clear error when the target is unreachable."""
    if not HAS_PSYCOPG2:
        raise LedgerError("psycopg2 is not importable by %s: run 'make setup' and use the "
                          "virtualenv's interpreter" % os.sys.executable)
    target = Target(url)
    try:
        conn = psycopg2.connect(url, connect_timeout=connect_timeout, application_name=application_name)
    except psycopg2.Error as exc:
        raise LedgerError("cannot connect to %s: %s" % (target.name, redact(str(exc)).strip()),
                          target=target.name)
    conn.autocommit = autocommit
    return conn


def connect_through_swap(url, connect_timeout=10, application_name=LEASE_APPLICATION):
    """connect(), retried twice: a connection that arrives during a restore's swap waits on the
    database's lock, then is refused once ("database ... does not exist. It seems to have just been dropped
    or renamed"); the name is back (the restored copy) a moment later."""
    for attempt in range(3):
        try:
            return connect(url, autocommit=True, connect_timeout=connect_timeout, application_name=application_name)
        except LedgerError:
            if attempt == 2:
                raise
            time.sleep(0.3)


# --------------------------------------------------------------------------- errors

def pg_error(exc):
    """The fields of a psycopg2 error that an operator needs."""
    diag = getattr(exc, "diag", None)
    out = {
        "sqlstate": getattr(exc, "pgcode", None),
        # No SQLSTATE and a connection error: the connection was lost (the server sent nothing, or libpq
        # dropped what it sent: see ledger_lost), not an error of the statement.
        "lost": getattr(exc, "pgcode", None) is None and HAS_PSYCOPG2
        and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)),
        "message": redact((getattr(diag, "message_primary", None) or str(exc)).strip()),
        "detail": redact(getattr(diag, "message_detail", None)),
        "hint": getattr(diag, "message_hint", None),
        "position": None,
        "context": redact(getattr(diag, "context", None)),
    }
    pos = getattr(diag, "statement_position", None)
    if pos:
        try:
            out["position"] = int(pos)
        except ValueError:
            pass
    return out


def lost_connection_text(message):
    """What a lost connection is said as, instead of a SQLSTATE it does not have."""
    # libpq's "This probably means the server terminated abnormally" is a guess, often wrong
    # (a terminated session, a network cut): ledger_lost says what the server tells instead.
    message = " ".join(str(message or "").split()).split(" This probably means", maxsplit=1)[0].rstrip(". ")
    return "no SQLSTATE: the connection to the server was lost (%s)" % message


def error_head(err):
    """`SQLSTATE 42P07: relation "x" already exists`, or what stands for a SQLSTATE the error has not."""
    if err.get("sqlstate"):
        return "SQLSTATE %s: %s" % (err["sqlstate"], err.get("message"))
    if err.get("lost"):
        return lost_connection_text(err.get("message"))
    return "no SQLSTATE (an error of the client library, not of the server): %s" % err.get("message")


def format_pg_error(err):
    """One line: `SQLSTATE 42P07: relation "x" already exists (hint: ...)`."""
    text = error_head(err)
    if err.get("detail"):
        text += " (detail: %s)" % err["detail"]
    if err.get("hint"):
        text += " (hint: %s)" % err["hint"]
    return text


# --------------------------------------------------------------------------- records

def new_run_id():
    """A run id: UTC time first so ids sort, then randomness so they never collide."""
    return datetime.datetime.utcnow().strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def actor():
    """Who runs this: the OS user and host of the controller (not the database role)."""
    try:
        user = getpass.getuser()
    except Exception:  # pragma: no cover - no passwd entry in some containers
        user = str(os.getuid())
    return "%s@%s" % (user, socket.gethostname())


def ensure_records(cur):
    """Create the migrations schema and its tables if missing (idempotent)."""
    cur.execute("SELECT to_regclass('migrations.history') IS NOT NULL AND to_regclass('migrations.events') IS NOT NULL"
                " AND to_regclass('migrations.lock') IS NOT NULL")
    if cur.fetchone()[0]:
        return False
    cur.execute(RECORDS_DDL)
    return True


def records_exist(cur):
    cur.execute("SELECT to_regclass('migrations.history') IS NOT NULL")
    return bool(cur.fetchone()[0])


def log_event(cur, run_id, action, outcome, version=None, duration_ms=None, detail=None):
    """Append one row to migrations.events (the caller owns the transaction)."""
    cur.execute(
        "INSERT INTO migrations.events (run_id, actor, action, version, outcome, duration_ms, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
        (run_id, actor(), action, version, outcome, duration_ms,
         json.dumps(redact_obj(detail or {}), default=str)),
    )


def log_event_autonomous(url, run_id, action, outcome, version=None, duration_ms=None, detail=None):
    """Log an event on its own connection, so it survives the caller's rollback.

    Used for failures: the failed migration's transaction is rolled back, its
    event must stay. Never raises: a failure to log must not hide the real error.
    """
    try:
        conn = connect(url, autocommit=True)
        try:
            with conn.cursor() as cur:
                ensure_records(cur)
                log_event(cur, run_id, action, outcome, version, duration_ms, detail)
        finally:
            conn.close()
        return True
    except Exception:  # noqa: BLE001 - best effort by design
        return False


def redact_obj(obj):
    """Redact passwords in every string of a JSON-like structure."""
    if isinstance(obj, dict):
        return dict((k, redact_obj(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    if isinstance(obj, str):
        return redact(obj)
    return obj


def server_version_num(cur):
    cur.execute("SHOW server_version_num")
    return int(cur.fetchone()[0])
