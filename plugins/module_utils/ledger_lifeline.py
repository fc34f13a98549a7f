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

On a database host reached over SSH neither the playbook nor its worker is a process there. Two more
pieces stop a PITR there: on the controller, die_with_playbook() in the worker (the action plugin)
kills the worker's own process group, the ssh client with it, once ansible-playbook has exited (a
SIGKILL of the playbook's group does not reach the worker, in its own session; a SIGTERM or SIGINT
does, and Ansible's worker then kills that group itself); on the database host, a Lifeline with
``channel`` watches the module's standard output, its SSH channel (a pipe to sshd, or the pty that
become with su gets), and dies when that hangs up, as it does when the ssh client is gone.

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


def _alive(watched):
    """Whether (pid, start time) is still that process (pids are reused)."""
    return watched[1] is not None and _start_time(watched[0]) == watched[1]


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

    channel: watch this process's standard output, the SSH channel of a module run on a remote host, and
    die when it hangs up (the ssh client on the controller is gone); parent_alive() says False then.
    """

    def __init__(self, playbook_pid=None, channel=False):
        self.parent = os.getppid()
        self.armed = False
        self.watched = None
        if playbook_pid and int(playbook_pid) not in (self.parent, 1):
            self.watched = (int(playbook_pid), _start_time(int(playbook_pid)))
        self.channel = _STDOUT if channel else None
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
        if self.channel is not None:
            self.armed = True
            threading.Thread(target=self._watch_channel, name="ledger-lifeline-channel", daemon=True).start()
        return self

    def _watch(self):
        while _alive(self.watched):
            time.sleep(0.2)
        self._die()

    def _watch_channel(self):
        if _hung_up(self.channel, None):
            self._die()

    def _die(self):
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
        if self.watched is not None and not _alive(self.watched):
            return False
        if self.channel is not None and _hung_up(self.channel, 0):
            return False
        return self.parent <= 1 or os.getppid() == self.parent


_STDOUT = 1
_HANGUP = select.POLLHUP | select.POLLERR


def _hung_up(fd, timeout):
    """Whether ``fd`` hangs up within ``timeout`` seconds (None: waits for it): the read side of a pipe closed
    (POLLERR), a pty whose master was closed (POLLHUP). A file or /dev/null never does; a closed fd is not a
    hang-up."""
    poller = select.poll()
    poller.register(fd, 0)  # hang-ups are reported whatever the mask
    while True:
        try:
            events = poller.poll(None if timeout is None else int(timeout * 1000))
        except InterruptedError:  # pragma: no cover - retried by Python itself since 3.5
            continue
        return any(ev & _HANGUP for _fd, ev in events)


def die_with_playbook(playbook_pid):
    """On the controller, in Ansible's worker (an action plugin): once ``playbook_pid`` (ansible-playbook) has
    exited, kill the worker's process group, its ssh client with it; returns an Event that ends the watch.

    Ansible's worker runs in a session of its own, as its group's leader, so a SIGKILL of the playbook's group
    leaves it and its ssh client running, and a recovery on the database host would go on to its swap. Ansible's
    own SIGTERM and SIGINT handler kills that same group. Not being the group's leader, only the worker dies.
    """
    done = threading.Event()
    if int(playbook_pid) <= 1:  # already re-parented to init: the playbook is gone, the worker ends anyway
        return done
    watched = (int(playbook_pid), _start_time(int(playbook_pid)))
    if watched[1] is None:
        return done

    def watch():
        while _alive(watched):
            if done.wait(0.2):
                return
        if not done.is_set():
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="ledger-lifeline-playbook", daemon=True).start()
    return done


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
