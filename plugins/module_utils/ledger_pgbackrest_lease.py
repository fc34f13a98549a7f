# -*- coding: utf-8 -*-
"""The leases of a point-in-time recovery: who may touch the target, and the cluster, meanwhile.

A PITR rewinds and restarts the whole cluster, so it holds two things for its whole length:

* the cluster lock: an flock on ``<data_directory>.ledger-pitr.lock`` beside the data
  directory, on the database host. It is what a second PITR of the same cluster (of any of its
  databases) waits for, also while the server is down; the file names the holder (run id, who,
  pid, since when). The kernel drops it when the process dies: it never outlives its run.
* the target's run lease (migrations.lock, the one migrate, revert and the dump restore take,
  through the dump restore's RestoreLease: no connection held between beats). Migrate, revert,
  a dump restore of the target wait for it within their lock wait, then refuse naming it.

While the server is down for the swap (stop, rename, start: seconds) nobody can connect, so a
run that starts then fails to connect and says so; the lease it would have checked is not lost:
before the swap the lease row (this run's, expiring ttl + the swap's hold later) is written into
the recovered copy, so the target comes back already leased to this PITR, and no other run can
slip in between the start and the restore's event. The run deletes it at the end. A PITR that
dies after the swap leaves a lease that expires by itself (ttl + hold), as a dead migrate's does.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, actor, log_event_autonomous
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import say_now

LOCK_SUFFIX = ".ledger-pitr.lock"


def lock_path(data_directory):
    return data_directory.rstrip("/") + LOCK_SUFFIX


class ClusterLock(object):
    """An flock on <data_directory>.ledger-pitr.lock, waited for at most ``wait`` seconds."""

    def __init__(self, data_directory, run_id, target, wait, owner=None, url=None, poll=0.3):
        self.path = lock_path(data_directory)
        self.run_id, self.target, self.wait, self.owner, self.url, self.poll = run_id, target, wait, owner, url, poll
        self.fd = None
        self.waited_s = 0.0

    def holder(self):
        """What the file says about its holder ({} when unreadable or empty)."""
        try:
            with open(self.path) as fh:
                return json.loads(fh.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise LedgerError("cannot open the cluster's PITR lock %s: %s. Nothing was changed" % (self.path, exc))
        if self.owner is not None and os.geteuid() == 0:
            os.fchown(fd, self.owner.pw_uid, self.owner.pw_gid)
        t0 = time.monotonic()
        said_at, logged = t0, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise LedgerError("cannot lock %s: %s. Nothing was changed" % (self.path, exc))
            now = time.monotonic()
            holder = self.holder()
            if not logged and self.url:
                log_event_autonomous(self.url, self.run_id, "lock_wait", "waiting",
                                     detail={"lock": self.path, "holder": holder, "lock_wait_s": self.wait})
                logged = True
            if now - t0 >= self.wait:
                os.close(fd)
                raise LedgerError(
                    "another point-in-time recovery of this cluster is running: %s; waited %ds for it. Nothing was "
                    "changed; re-run once it is done (it releases %s when it ends, also if it dies)"
                    % (describe_holder(holder), self.wait, self.path), holder=holder, sqlstate="55P03")
            if now >= said_at:
                said_at = now + 15.0
                say_now("waiting for the PITR lock of %s's cluster (%ds of at most %ds): %s"
                        % (self.target, now - t0, self.wait, describe_holder(holder)))
            time.sleep(self.poll)
        self.fd = fd
        self.waited_s = round(time.monotonic() - t0, 2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_id": self.run_id, "holder": actor(), "pid": os.getpid(), "target": self.target,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def describe_holder(holder):
    if not holder:
        return "a run whose lock file names nobody yet"
    keys = ("run_id", "holder", "pid", "target", "since")
    return "run %s by %s (pid %s) on %s since %s" % tuple(holder.get(k) for k in keys)


def copy_lease_sql(lease, hold):
    """SQL that writes ``lease``'s row into the recovered copy, expiring ttl + hold seconds later.

    The copy is reached with psql only (a private socket, as the cluster's OS user), hence SQL
    text; the values are the lease's own (run id, holder), quoted as literals.
    """
    def lit(text):
        return "'" + str(text).replace("'", "''") + "'"
    seconds = float(lease.ttl) + float(hold)
    return ("INSERT INTO migrations.lock (id, run_id, holder, acquired_at, renewed_at, expires_at)"
            " VALUES (1, %s, %s, now(), now(), clock_timestamp() + %s * interval '1 second')"
            " ON CONFLICT (id) DO UPDATE SET run_id = excluded.run_id, holder = excluded.holder,"
            " acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at, expires_at = excluded.expires_at"
            % (lit(lease.run_id), lit(lease.holder), "%.1f" % seconds))
