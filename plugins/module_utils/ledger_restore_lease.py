# -*- coding: utf-8 -*-
"""The run lease as a restore (and the leftovers cleanup) takes it: no session left on the target while it
waits, beats or parks."""

from __future__ import annotations

import re

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LEASE_APPLICATION, LedgerError, connect, connect_through_swap, describe_target, ensure_records, format_pg_error,
    pg_error,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import Lease
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rollback_plan import _cmd

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None


class RestoreLease(Lease):
    """The per-target run lease of migrate and revert (migrations.lock), taken by a restore.

    It holds no connection to the target between its polls (as every lease waiter) nor between its
    beats (unlike migrate's heartbeat): a session connected to the target would block the swap
    (ALTER DATABASE ... RENAME refuses while anyone is connected). Before the swap park() stops the
    heartbeat and pushes the expiry out by ``hold`` seconds, so nobody takes the lease while the names
    change; after the swap the row is
    in the kept database (and deleted there), and the restored database's lease was cleared with
    the copy's check: the target is free again.
    """

    def __init__(self, url, run_id, ttl, wait, connect_timeout, advice=None, what="restore"):
        super(RestoreLease, self).__init__(url, None, run_id, ttl=ttl if ttl is not None else 60.0, wait=wait,
                                           advice=advice, connect_timeout=connect_timeout)
        self.holder = "%s by %s" % (what, self.holder)

    @property
    def tag(self):
        """The tag this run's scratch and kept database names carry: the lease's own (see lease_tag)."""
        return self.nonce[:6]

    def _beat(self):
        """Renew every ttl/3 seconds, each time on a connection of its own, closed at once."""
        interval = max(0.3, self.ttl / 3.0)
        while not self._stop.wait(interval):
            try:
                conn = connect(self.url, autocommit=True, connect_timeout=self.connect_timeout,
                               application_name=LEASE_APPLICATION)
            except LedgerError:
                continue  # a missed beat is retried; the lease outlives two of them
            try:
                with conn.cursor() as cur:
                    cur.execute("UPDATE migrations.lock SET renewed_at = clock_timestamp(),"
                                " expires_at = clock_timestamp() + %s * interval '1 second'"
                                " WHERE id = 1 AND run_id = %s AND holder = %s RETURNING 1",
                                (self.ttl, self.run_id, self.holder))
                    if cur.fetchone() is None:
                        self.lost = "someone else"
            except psycopg2.Error:
                pass
            finally:
                conn.close()

    def park(self, hold):
        """Stop the heartbeat and extend the lease by ``hold`` seconds; no connection to the target stays open."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        conn = connect_through_swap(self.url, self.connect_timeout)
        try:
            with conn.cursor() as cur:
                cur.execute("UPDATE migrations.lock SET renewed_at = clock_timestamp(),"
                            " expires_at = clock_timestamp() + %s * interval '1 second'"
                            " WHERE id = 1 AND run_id = %s AND holder = %s", (self.ttl + hold, self.run_id, self.holder))
        finally:
            conn.close()

    def release_in(self, url):
        """Delete this lease's row from the database at ``url`` (the kept database after the swap)."""
        self._stop.set()
        self.held = False
        try:
            conn = connect(url, autocommit=True, connect_timeout=self.connect_timeout)
        except LedgerError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("DELETE FROM migrations.lock WHERE id = 1 AND run_id = %s AND holder = %s",
                            (self.run_id, self.holder))
            return True
        except psycopg2.Error:
            return False
        finally:
            conn.close()


_HOLDER_NONCE = re.compile(r" lease ([0-9a-f]{6})[0-9a-f]*$")


def lease_tag(holder):
    """The name tag of the run holding a lease (a restore's scratch copy ends with ``_<tag>``), or None."""
    m = _HOLDER_NONCE.search(holder or "")
    return m.group(1) if m else None


def take_restore_lease(p, what="restore", again="-e rollback_mode=restore"):
    """The target's run lease (the one migrate and revert take), or a refusal naming its holder.

    ``what`` names the taker in the lease row (``restore by user@host pid N lease <hex>``); ``again``
    is the rollback playbook's option that re-runs it, for the refusal's next command.
    """
    url = p["database_url"]
    conn = connect_through_swap(url, p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            # The lease lives in migrations.lock: a target never migrated gets its (empty) records here.
            ensure_records(cur)
    except psycopg2.Error as exc:
        raise LedgerError("cannot prepare the run lease on %s: %s. Nothing was changed"
                          % (describe_target(url), format_pg_error(pg_error(exc))), sqlstate=exc.pgcode)
    finally:
        conn.close()
    lease = RestoreLease(url, p.get("run_id") or "adhoc", p.get("lock_ttl"), p.get("lock_wait"),
                         p["connect_timeout"], advice=_RestoreAdvice(p.get("host_label"), again), what=what)
    return lease.acquire()


class _RestoreAdvice(object):
    def __init__(self, host, again):
        self.host = host
        self.again = again

    def migrate(self):
        return _cmd(self.host, self.again)
