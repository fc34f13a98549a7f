# -*- coding: utf-8 -*-
"""The records in the target database: history (read, drift, inspection) and the run lease.

See ledger_engine's docstring for the lease's design (a row, a token per runner,
heartbeat, waits outside any transaction).
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import threading
import time
import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    APPLICATION_NAME,
    LedgerError,
    actor,
    connect,
    connect_through_swap,
    describe_target,
    ensure_records,
    log_event,
    pg_error,
)

try:
    import psycopg2
except ImportError:  # pragma: no cover - connect() reports it
    psycopg2 = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import VERSION_RE

# Default lock_wait = lock_ttl + this: a run started right after a runner was SIGKILLed
# waits for the dead run's lease to expire (at most lock_ttl) and takes it over.
LOCK_WAIT_MARGIN = 30.0


def say_now(text):
    """A line for the operator while a run waits (not in the result, which comes at the end).

    Only where Ansible's Display is already loaded (the in-process modules run in the playbook's worker,
    whose Display goes to the operator's terminal); a module run as its own process says nothing here, since
    its stdout is its JSON result.
    """
    mod = sys.modules.get("ansible.utils.display")
    if mod is not None:
        try:
            mod.Display().display("[ledger] %s" % text)
        except Exception:  # noqa: BLE001 - a progress line must never fail the run
            pass


def elapsed_ms(t0):
    return int(round((time.monotonic() - t0) * 1000))


def safe_rollback(conn):
    try:
        if not conn.closed:
            conn.rollback()
        return True
    except Exception:  # noqa: BLE001 - the connection is gone; the server rolls back
        return False


class Advice(object):
    """What to run next, as the core says it; the module layer words it as commands (ledger_next)."""

    def migrate(self):
        return "the migrate stage again"

    def rollback(self, extra):
        return "the rollback stage (%s)" % extra

    def accept_checksum(self, version):
        return "the accept_checksum action for %s" % version

    def status(self):
        return "the status report"


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


def drift_of(history, migrations):
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


def inspect(conn, migrations, target=None, allow_out_of_order=False, advice=None):
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
    drift = drift_of(history, migrations)

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
                              " `%s`" % (target, current, (advice or Advice()).rollback("-e rollback_to=%s" % target)))
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

    A runner's waiter holds no session on the target (``let_go``). The first attempt uses
    ``conn`` (the run's connection, or none); when the lease is busy that connection is closed,
    each later poll (and each lock_wait event) opens one of its own (application_name
    LEASE_APPLICATION) and closes it at once, and acquire() reconnects once the lease is
    taken (``self.conn`` is then a new session: the runner takes it from there). A session
    kept on the target while waiting would block a restore's swap, which renames the database
    and needs every other session gone, until its swap_timeout; a short poll ends within
    milliseconds, and one arriving during the swap finds the restored database under the name.
    """

    def __init__(self, url, conn, run_id, ttl=60.0, wait=None, advice=None, poll=0.5, connect_timeout=10,
                 let_go=False):
        self.url = url
        self.conn = conn
        self.connect_timeout = connect_timeout
        self.let_go = let_go
        self._reattach = False
        self.run_id = run_id
        self.ttl = float(ttl)
        self.wait = float(wait) if wait is not None else self.ttl + LOCK_WAIT_MARGIN
        self.advice = advice
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
            safe_rollback(conn)
            if exc.pgcode == "55P03":
                return "busy", None
            raise
        finally:
            if not conn.closed:
                conn.autocommit = True

    def _attached(self):
        return self.conn is not None and not self.conn.closed

    def _poll(self):
        """One attempt: on the run's connection while it has one, else on a connection of its own."""
        if self._attached():
            return self._try()
        self.conn = connect_through_swap(self.url, self.connect_timeout)
        try:
            try:
                return self._try()
            except psycopg2.Error as exc:
                # A restore swapped in a database restored from a backup taken before any run: no records yet.
                if exc.pgcode != "42P01":
                    raise
                create_records(self.conn)
                return self._try()
        finally:
            self.conn.close()

    def _let_go(self):
        """Close the run's connection for the wait (reopened by acquire() once the lease is taken)."""
        if self.let_go and self._attached():
            self.conn.close()
            self._reattach = True

    def _is_mine(self, run_id, holder):
        """Whether a lease row (run_id, holder) is this Lease object's (not merely this run id's)."""
        return run_id == self.run_id and holder == self.holder

    def _event(self, outcome, duration_ms=None, detail=None):
        attached = self._attached()
        try:
            conn = self.conn if attached else connect_through_swap(self.url, self.connect_timeout)
        except LedgerError:
            return  # an event is not worth failing the wait for
        try:
            with conn.cursor() as cur:
                log_event(cur, self.run_id, "lock_wait", outcome, duration_ms=duration_ms, detail=detail)
        except psycopg2.Error:
            safe_rollback(conn)
        finally:
            if not attached:
                conn.close()

    # ---------------------------------------------------------------- API
    def acquire(self):
        t0 = time.monotonic()
        deadline = t0 + self.wait
        logged = False
        holder = None
        said_at = t0
        while True:
            try:
                state, info = self._poll()
            except psycopg2.Error as exc:
                raise LedgerError("cannot take the run lease on %s: %s" % (describe_target(self.url),
                                                                           pg_error(exc)["message"]),
                                  target=describe_target(self.url), sqlstate=exc.pgcode)
            if state == "acquired":
                self.held = True
                self.waited_s = round(time.monotonic() - t0, 2)
                if self._reattach:
                    self._reattach = False
                    self.conn = connect_through_swap(self.url, self.connect_timeout, APPLICATION_NAME)
                if info is not None:
                    self.takeover = info
                    self._event("taken_over", elapsed_ms(t0), {"previous": info})
                elif logged:
                    self._event("acquired", elapsed_ms(t0), {"waited_s": self.waited_s, "previous": holder})
                self._start_heartbeat()
                return self
            holder = info or holder
            now = time.monotonic()
            if not logged:
                self._event("waiting", None, {"holder": holder, "lock_wait_s": self.wait})
                logged = True
                self._let_go()
            if now >= said_at:
                said_at = now + 15.0
                say_now("waiting for the run lease on %s (%ds of at most %ds): %s" % (
                    describe_target(self.url), now - t0, self.wait,
                    "held by run %s (%s), expires in %ss%s" % (
                        holder["run_id"], holder["holder"], holder["expires_in_s"],
                        " (a run that stopped renewing it: it is taken over when it expires)"
                        if holder["renewed_s_ago"] is not None and holder["renewed_s_ago"] > self.ttl else "")
                    if holder else "its row is locked by a running migration"))
            if now >= deadline:
                self._event("timeout", elapsed_ms(t0), {"holder": holder})
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
        cmd = (self.advice or Advice()).migrate()
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
                    safe_rollback(hb)
        if hb is not None and not hb.closed:
            hb.close()

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.held:
            return
        self.held = False
        attached = self._attached()
        conn = None
        try:
            conn = self.conn if attached else connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
            safe_rollback(conn)
            conn.autocommit = False
            with conn.cursor() as cur:
                # A session of this run whose client side was cut may still hold the row (ledger_lost):
                # never wait for it, the lease expires by itself.
                cur.execute("SET LOCAL lock_timeout = '2s'")
                cur.execute("DELETE FROM migrations.lock WHERE id = 1 AND run_id = %s AND holder = %s",
                            (self.run_id, self.holder))
            conn.commit()
        except Exception:  # noqa: BLE001 - it expires by itself
            if conn is not None:
                safe_rollback(conn)
        finally:
            if conn is not None and not conn.closed:
                if attached:
                    conn.autocommit = True
                else:
                    conn.close()


def create_records(conn):
    """Create the records schema (idempotent; retried when two first runs race on it)."""
    for attempt in range(5):
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                created = ensure_records(cur)
            conn.commit()
            return created
        except psycopg2.Error as exc:
            safe_rollback(conn)
            if exc.pgcode not in ("23505", "42P06", "42P07", "40P01") or attempt == 4:
                raise LedgerError("cannot create the migrations records schema: %s" % pg_error(exc)["message"],
                                  sqlstate=exc.pgcode)
            time.sleep(0.1 * (attempt + 1))
        finally:
            if not conn.closed:
                conn.autocommit = True
    return False


# =========================================================================== status

def status(url, migrations, target=None, allow_out_of_order=False, advice=None):
    """Read-only report: applied (when, by whom, how long), pending, drift, out-of-order, lease.

    Returns the inspect() dict with Migration objects turned into dicts, plus
    ``lines`` (human-readable) and ``lease`` (the current holder, or None).
    """
    conn = connect(url, autocommit=True)
    try:
        info = inspect(conn, migrations, target, allow_out_of_order, advice=advice)
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
