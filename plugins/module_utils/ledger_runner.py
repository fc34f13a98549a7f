# -*- coding: utf-8 -*-
"""Running migrations: settings, timeouts and retries, one transaction per file, the run's state.

Runner holds one apply or revert run (connection, lease, settings, what it did)
and turns a failed statement into the structured LedgerError every action raises.
"""

from __future__ import annotations

import random
import re
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    connect,
    describe_target,
    error_head,
    log_event,
    log_event_autonomous,
    new_run_id,
    pg_error,
    redact,
)

try:
    import psycopg2
    from psycopg2.extensions import quote_ident
except ImportError:  # pragma: no cover - connect() reports it
    psycopg2 = quote_ident = None

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_lost
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import (
    Advice,
    LOCK_WAIT_MARGIN,
    Lease,
    create_records,
    elapsed_ms,
    safe_rollback,
)

# SQLSTATEs retried with back-off: lock_not_available (lock_timeout, NOWAIT) and
# deadlock_detected (a migration that met application traffic the other way round).
RETRIABLE = ("55P03", "40P01")

DEFAULTS = {
    "lock_timeout": "2s",
    "statement_timeout": "0",
    "lock_retries": 3,
    "retry_backoff": 0.5,
    "retry_backoff_max": 30.0,
    "lock_wait": None,  # lock_ttl + LOCK_WAIT_MARGIN: a re-run right after a killed run outwaits its lease
    "lock_ttl": 60.0,
    "connection_check": "1s",
    "commit_settle_s": 120.0,  # see COMMIT_SETTLE_SECONDS
}


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


def run_settings(kw):
    s = dict(DEFAULTS)
    for k, v in kw.items():
        if v is not None:
            s[k] = v
    s["lock_timeout_sql"], s["lock_timeout_s"] = parse_duration(s["lock_timeout"], "lock_timeout")
    s["statement_timeout_sql"], s["statement_timeout_s"] = parse_duration(s["statement_timeout"], "statement_timeout")
    s["connection_check_sql"], _unused = parse_duration(s["connection_check"], "connection_check")
    s["lock_retries"] = max(0, int(s["lock_retries"]))
    if s["lock_wait"] is None:
        s["lock_wait"] = float(s["lock_ttl"]) + LOCK_WAIT_MARGIN
    for k in ("retry_backoff", "retry_backoff_max", "lock_wait", "lock_ttl"):
        s[k] = float(s[k])
    if s["lock_ttl"] < 1:
        raise LedgerError("lock_ttl must be at least 1 second")
    return s


def set_timeouts(cur, s, local=True):
    scope = "SET LOCAL" if local else "SET"
    cur.execute("%s lock_timeout = %%s" % scope, (s["lock_timeout_sql"],))
    cur.execute("%s statement_timeout = %%s" % scope, (s["statement_timeout_sql"],))
    # A runner killed mid-statement: the server checks the socket and ends the
    # backend (and so the transaction) instead of finishing a pg_sleep/long query.
    cur.execute("%s client_connection_check_interval = %%s" % scope, (s["connection_check_sql"],))


def backoff(s, attempt):
    """Exponential back-off with jitter: base * 2^attempt, times a random factor in [0.5, 1.5)."""
    delay = s["retry_backoff"] * (2 ** attempt) * (0.5 + random.random())
    return min(delay, s["retry_backoff_max"])


def error_line(stmt, err, dollar_line_hint=True):
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
        safe_rollback(conn)
        return []


def _stats_blind_role(conn):
    """The current role when it cannot see other roles' queries (neither superuser nor pg_read_all_stats), else None."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, r.rolsuper OR pg_catalog.pg_has_role(current_user, 'pg_read_all_stats',"
                        " 'USAGE') FROM pg_catalog.pg_roles r WHERE r.rolname = current_user")
            row = cur.fetchone()
            return None if row is None or row[1] else row[0]
    except Exception:  # noqa: BLE001 - diagnostics only
        safe_rollback(conn)
        return None


def invalid_indexes(conn):
    """INVALID indexes of the database: [{schema, index, table, cleanup}] (left by a failed CONCURRENTLY build)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT n.nspname, c.relname, t.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
            " FROM pg_catalog.pg_index i"
            " JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_catalog.pg_class t ON t.oid = i.indrelid"
            " WHERE NOT i.indisvalid ORDER BY 1, 2")
        out = []
        for schema, index, table, qualified in cur.fetchall():
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
                client_port = Target(url).port
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


def reset_session(conn):
    """Discard every session setting of a connection of our own (a direct one, never a pooled one)."""
    if conn is None or conn.closed:
        return
    try:
        safe_rollback(conn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("RESET ALL")
    except Exception:  # noqa: BLE001 - the connection is closed right after anyway
        pass


def named_in(migration_statements, name):
    pat = re.compile(r'(?<![A-Za-z0-9_$"])"?%s"?(?![A-Za-z0-9_$])' % re.escape(name), re.IGNORECASE)
    return any(pat.search(st.masked) for st in migration_statements)


# =========================================================================== running one migration

class StepFailed(Exception):
    """A statement of a migration failed: carries what the failure report needs."""

    def __init__(self, err, stmt, lost=False, no_retry=False, backend_pid=None):
        super(StepFailed, self).__init__(err.get("message"))
        self.err = err
        self.stmt = stmt
        self.lost = lost
        self.no_retry = no_retry
        self.backend_pid = backend_pid  # the session that ran it: after a lost connection, is it still there?
        self.found = None  # after a lost connection: what Runner.recover found (ledger_lost.find_out)


def run_statements(cur, statements):
    stmt = None
    pid = cur.connection.get_backend_pid()
    try:
        for stmt in statements:
            cur.execute(stmt.text)
    except psycopg2.Error as exc:
        raise StepFailed(one_line(pg_error(exc)), stmt, lost=exc.pgcode is None or bool(cur.connection.closed),
                         backend_pid=pid)


def one_line(err):
    """psycopg2's connection errors span lines: keep messages on one line."""
    if err.get("message"):
        err["message"] = " ".join(err["message"].split())
    return err


def run_in_tx(conn, lease, s, statements, finish):
    """One transaction: SET LOCAL timeouts, lease row lock, statements, finish(cur), lease renewal, COMMIT.

    Returns execution_ms of the statements. Raises StepFailed (statement error),
    CommitUnknown, psycopg2.Error (bookkeeping error) or LedgerError (lease lost).
    """
    conn.autocommit = False
    pid = conn.get_backend_pid()
    try:
        with conn.cursor() as cur:
            try:
                set_timeouts(cur, s)
                if lease is not None:
                    lease.check_in_tx(cur)
            except psycopg2.Error as exc:
                raise StepFailed(one_line(pg_error(exc)), None, lost=exc.pgcode is None, backend_pid=pid)
            t1 = time.monotonic()
            run_statements(cur, statements)
            ms = elapsed_ms(t1)
            try:
                cur.execute("RESET ROLE")
                finish(cur, ms)
                if lease is not None:
                    lease.renew_in_tx(cur)
            except psycopg2.Error as exc:
                raise StepFailed(one_line(pg_error(exc)), None, lost=exc.pgcode is None, backend_pid=pid)
        try:
            conn.commit()
        except psycopg2.Error as exc:
            raise CommitUnknown(pg_error(exc), pid)
        return ms
    except BaseException:
        safe_rollback(conn)
        raise
    finally:
        if not conn.closed:
            conn.autocommit = True


class CommitUnknown(Exception):
    """The reply to COMMIT never came: the server may have committed, or may still be committing."""

    def __init__(self, err, backend_pid=None):
        super(CommitUnknown, self).__init__(err.get("message"))
        self.err = err
        self.backend_pid = backend_pid


# How long the truth about a lost COMMIT is waited for: the old backend may still be running it
# (deferred triggers, synchronous replication). Beyond this, the outcome is reported as unknown.
COMMIT_SETTLE_SECONDS = DEFAULTS["commit_settle_s"]


def wait_backend_gone(conn, pid, timeout=COMMIT_SETTLE_SECONDS):
    """Wait until backend `pid` has ended (its COMMIT then either happened or not); True if it has.

    pg_stat_activity lists every backend's pid to every role, so this works without privileges.
    Only after the backend is gone does the history tell the truth: while it is still committing,
    a reader sees the state before its transaction.
    """
    if not pid:
        return True
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = %s", (pid,))
            if cur.fetchone() is None:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


class Runner(object):
    """State of one apply or revert run (connection, lease, settings, what it did)."""

    def __init__(self, url, migrations, run_id, s, advice, action, direct_url=None):
        self.url = url
        self.direct_url = direct_url or None
        self.direct_checked = False
        self.route = None
        self.target = describe_target(url)
        self.migrations = migrations
        self.run_id = run_id or new_run_id()
        self.s = s
        self.advice = advice or Advice()
        self.action = action
        self.conn = connect(url, autocommit=True)
        self.server_started = ledger_lost.server_start(self.conn)  # a restart is told apart by it (ledger_lost)
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
        create_records(self.conn)
        self.lease = Lease(self.url, self.conn, self.run_id, ttl=self.s["lock_ttl"], wait=self.s["lock_wait"],
                           advice=self.advice, let_go=True)
        self.lease.acquire()
        # A run that waited let go of its session meanwhile (it would block a restore's swap): a new one.
        self.conn = self.lease.conn

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
        names = ", ".join(f for _unused, f in files)
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
        rerun = (self.advice.rollback("-e rollback_to=...") if self.action == "revert"
                 else self.advice.migrate())
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
        raise LedgerError(msg, target=self.target, route=rt, nontx_files=[f for _unused, f in files],
                          next_command=nxt, applied=[d["version"] for d in self.done])

    def nontx_conn(self):
        """A connection of its own for one no-transaction file: direct_url, else the database URL.

        It is reset and closed after the file, so nothing the file sets outlives it.
        """
        return connect(self.direct_url or self.url, autocommit=True)

    def settle_commit(self, exc):
        """After CommitUnknown: a new connection, and the old backend gone (True) or still running (False)."""
        self.reconnect()
        return wait_backend_gone(self.conn, exc.backend_pid, self.s.get("commit_settle_s", COMMIT_SETTLE_SECONDS))

    def reconnect(self):
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        self.conn = connect(self.url, autocommit=True)
        if self.lease is not None:
            self.lease.conn = self.conn
        return self.conn

    def recover(self, exc):
        """After a lost connection (StepFailed.lost): a new connection, and what is true (exc.found), once."""
        if not exc.lost or exc.found is not None:
            return exc.found
        exc.found = ledger_lost.find_out(self.reconnect, exc.backend_pid, self.server_started,
                                         self.s.get("commit_settle_s", COMMIT_SETTLE_SECONDS), wait_backend_gone)
        return exc.found

    def event(self, action, outcome, version=None, duration_ms=None, detail=None):
        """Append an event on the run's connection (autocommit), or on a new one if it is gone."""
        try:
            if self.conn.closed:
                raise psycopg2.InterfaceError("closed")
            with self.conn.cursor() as cur:
                log_event(cur, self.run_id, action, outcome, version, duration_ms, detail)
        except Exception:  # noqa: BLE001
            safe_rollback(self.conn)
            log_event_autonomous(self.url, self.run_id, action, outcome, version, duration_ms, detail)

    # ------------------------------------------------------------------ retries
    def with_retries(self, label, version, filename, fn):
        """Run fn() (one whole transaction) again after a lock timeout/deadlock, with back-off and jitter."""
        attempt = 0
        while True:
            try:
                return fn(), attempt + 1
            except StepFailed as exc:
                code = exc.err.get("sqlstate")
                if code in RETRIABLE and attempt < self.s["lock_retries"] and not exc.lost and not exc.no_retry:
                    delay = backoff(self.s, attempt)
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
        line = error_line(stmt, err) if stmt is not None else None
        attempts = getattr(exc, "attempts", 1)
        found = self.recover(exc) if isinstance(exc, StepFailed) else None
        fields = {
            "target": self.target, "version": m_version, "file": filename, "file_path": path, "line": line,
            "sqlstate": err.get("sqlstate"), "message": err.get("message"), "detail": err.get("detail"),
            "hint": err.get("hint"), "statement": stmt.summary() if stmt is not None else None,
            "attempts": attempts, "run_id": self.run_id, "applied" if self.action == "apply" else "reverted":
                [d["version"] for d in self.done], "version_before": self.version_before,
        }
        if found is not None:
            fields["connection_lost"] = found
        if err.get("sqlstate") in RETRIABLE:
            fields["blockers"] = _blockers(self.conn, self.s) if not self.conn.closed else []
            if not fields["blockers"] and not self.conn.closed:
                role = _stats_blind_role(self.conn)
                if role:
                    fields["blockers_hidden_from"] = role
                    fields["blockers_grant"] = "GRANT pg_read_all_stats TO %s;" % quote_ident(role, self.conn)
        if extra:
            fields.update(extra)
        where = "%s line %s" % (filename, line) if line else filename
        msg = "%s of %s failed on %s at %s: %s" % (
            stage, m_version, self.target, where, ledger_lost.header(err.get("message")) if found is not None
            else error_head(err))
        if found is not None:
            msg += "\n  " + ledger_lost.cause(found)
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
            if fields.get("blockers_hidden_from"):
                role = fields["blockers_hidden_from"]
                msg += ("\n  likely blocker: none visible: the role %s cannot see other roles' sessions in"
                        " pg_stat_activity (a superuser can; or run `%s` so that it can name them)"
                        % (role, fields["blockers_grant"]))
        elif err.get("sqlstate") == "57014":
            msg += "\n  the statement ran longer than statement_timeout=%s" % self.s["statement_timeout_sql"]
        if found is not None:
            transactional = (extra or {}).get("transactional", True)
            if not transactional and found["ended"] and stmt is not None and not self.conn.closed:
                # Outside a transaction the statement may have done its work: read what it left, once.
                found.setdefault("effect", ledger_lost.effect(self.conn, stmt))
            advice = ledger_lost.state(found, advice, transactional, filename, line)
        if advice:
            msg += "\n  " + advice
        fields["next_command"] = next_command
        msg += "\n  next: %s" % next_command
        fields["msg"] = msg
        started = getattr(self, "t_step", None)
        self.event(self.action, "failed", m_version, elapsed_ms(started) if started else None,
                   dict((k, v) for k, v in fields.items() if k != "msg"))
        return LedgerError(msg, **dict((k, v) for k, v in fields.items() if k != "msg"))
