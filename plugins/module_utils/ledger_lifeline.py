# -*- coding: utf-8 -*-
"""A stage's work must not outlive the playbook that started it.

Ansible's worker process (where the in-process modules run) calls setsid(): a SIGKILL of the
ansible-playbook process group does not reach it, so a restore would go on and swap the
databases after the operator saw the run die. Two defences, both Linux-only (elsewhere they
are no-ops and the parent check still works):

* die_with_parent(): prctl(PR_SET_PDEATHSIG, SIGTERM) on this process. Ansible's worker
  handles SIGTERM by killing its own process group (pg_restore included) and exiting; the
  server then rolls back whatever transaction the worker had open (the swap is one).
* parent_alive(): checked right before the point of no return (the swap): the parent seen at
  the start is still our parent. A worker re-parented to init (or a subreaper) stops there.

Children (pg_restore) get PR_SET_PDEATHSIG SIGKILL through child_preexec().
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

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


class Lifeline(object):
    """The parent this process started under; die_with_parent() arms the death signal."""

    def __init__(self):
        self.parent = os.getppid()
        self.armed = False

    def die_with_parent(self):
        # A process whose parent is already init has nobody to die with.
        if self.parent > 1:
            self.armed = _prctl_pdeathsig(signal.SIGTERM)
            # The parent may have died between getppid() and prctl(): the signal would never come.
            if os.getppid() != self.parent:
                os.kill(os.getpid(), signal.SIGTERM)
        return self

    def parent_alive(self):
        return self.parent <= 1 or os.getppid() == self.parent


def child_preexec():
    """preexec_fn of a child that must die with this process (pg_restore)."""
    _prctl_pdeathsig(signal.SIGKILL)
