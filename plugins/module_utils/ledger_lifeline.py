# -*- coding: utf-8 -*-
"""A stage's work must not outlive the playbook that started it.

Ansible's worker process (where the in-process modules run) calls setsid(): a SIGKILL of the
ansible-playbook process group does not reach it, so a restore would go on and swap the
databases after the operator saw the run die. Two defences, both Linux-only (elsewhere they
are no-ops and the parent check still works):

* die_with_parent(): prctl(PR_SET_PDEATHSIG, SIGKILL) on this process; the server then rolls
  back whatever transaction the worker had open (the swap is one). SIGKILL, not SIGTERM: Ansible's
  worker handles SIGTERM in Python, and a Python handler runs only once the statement in progress
  returns (a swap waiting on a lock would stay alive, waiting, after the playbook died); its
  handler runs no cleanup either (it re-raises the signal with the default action), so nothing is
  lost. A SIGTERM or Ctrl-C of the playbook reaches the worker the same way: ansible-playbook
  forwards it, then exits, and its death kills the worker.
* parent_alive(): checked right before the point of no return (the swap): the parent seen at
  the start is still our parent. A worker re-parented to init (or a subreaper) stops there.

Children (pg_restore; pgbackrest restore, psql, pg_ctl and the recovered copy's postmaster) get
PR_SET_PDEATHSIG SIGKILL through child_preexec().

disarm() ends the death signal for a step that is worse stopped half-way than finished (the PITR's
swap: stop, two renames, start); the caller checks parent_alive() after disarming, so a parent that
died before it is seen either way (killed while armed, or refused by the check).

A signal the worker does get (ansible-playbook forwards SIGTERM and SIGINT to it, then waits for it
before exiting) is handled in Python, so only between two statements: a statement waiting inside libpq
(a swap waiting on a lock) would keep the worker, and so the playbook, alive. interruptible_waits()
makes psycopg2 wait in Python (a wait callback, as psycopg2.extras.wait_select) while the stage runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import threading
import time

try:
    import psycopg2
    import psycopg2.extensions as pgext
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None

PR_SET_PDEATHSIG = 1

_libc = None


def _prctl_pdeathsig(sig):
    """prctl(PR_SET_PDEATHSIG, sig); True when it was set."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_time(pid):
    """The start time of process ``pid`` (its identity with the pid: pids are reused), or None once gone."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


class Lifeline(object):
    """The parent this process started under; die_with_parent() arms the death signal.

    playbook_pid: the ansible-playbook process when it is an ancestor, not the parent (a module run as
    its own process on a local connection: ansible-playbook > worker (own session) > sh > sh > python;
    the worker outlives a killed playbook, so the parent's death never comes). A thread then watches it
    and kills this process when it exits, while armed.
    """

    def __init__(self, playbook_pid=None):
        self.parent = os.getppid()
        self.armed = False
        self.watched = None
        if playbook_pid and int(playbook_pid) not in (self.parent, 1):
            self.watched = (int(playbook_pid), _start_time(int(playbook_pid)))
        self._lock = threading.Lock()

    def die_with_parent(self):
        # A process whose parent is already init has nobody to die with.
        if self.parent > 1:
            self.armed = _prctl_pdeathsig(signal.SIGKILL)
            # The parent may have died between getppid() and prctl(): the signal would never come.
            if os.getppid() != self.parent:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.watched is not None:
            self.armed = True
            threading.Thread(target=self._watch, name="ledger-lifeline", daemon=True).start()
        return self

    def _watch(self):
        pid, started = self.watched
        while started is not None and _start_time(pid) == started:
            time.sleep(0.2)
        with self._lock:
            if self.armed:
                os.kill(os.getpid(), signal.SIGKILL)

    def disarm(self):
        """No death from here on: a step that must not stop half-way (the PITR's swap) runs to its end."""
        with self._lock:
            if self.armed:
                _prctl_pdeathsig(0)
                self.armed = False
        return self

    def parent_alive(self):
        if self.watched is not None and _start_time(self.watched[0]) != self.watched[1]:
            return False
        return self.parent <= 1 or os.getppid() == self.parent


def child_preexec():
    """preexec_fn of a child that must die with this process (pg_restore)."""
    _prctl_pdeathsig(signal.SIGKILL)


def _wait(conn):
    """psycopg2.extras.wait_select, keeping connect_timeout (libpq ignores it for a connection made in the
    non-blocking mode a wait callback puts psycopg2 in)."""
    deadline = None
    if conn.status == pgext.STATUS_SETUP:
        timeout = pgext.parse_dsn(conn.dsn).get("connect_timeout")
        if timeout and float(timeout) > 0:
            deadline = time.monotonic() + float(timeout)
    while True:
        state = conn.poll()
        if state == pgext.POLL_OK:
            return
        if state == pgext.POLL_READ:
            fds = ([conn.fileno()], [])
        elif state == pgext.POLL_WRITE:
            fds = ([], [conn.fileno()])
        else:
            raise psycopg2.OperationalError("bad state from poll: %s" % state)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            ready = select.select(fds[0], fds[1], [], left)
        except KeyboardInterrupt:
            conn.cancel()
            raise
        if deadline is not None and not (ready[0] or ready[1]):
            raise psycopg2.OperationalError("timeout expired")


@contextlib.contextmanager
def interruptible_waits():
    """psycopg2 waits for the server in Python while this block runs (a signal's handler runs at once)."""
    if psycopg2 is None:
        yield
        return
    previous = pgext.get_wait_callback()
    pgext.set_wait_callback(_wait)
    try:
        yield
    finally:
        pgext.set_wait_callback(previous)
