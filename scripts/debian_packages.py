#!/usr/bin/env python3
"""Debian packages the project's tools need, installed with apt-get as root: the one home of that step.

    debian_packages.py install PACKAGE [PACKAGE ...]

Used by `.ci/run` and by the tools that install what they miss (pgcluster.py: postgresql-15 and
pgbackrest; pgbouncer_ctl.py: pgbouncer; sshd_ctl.py: openssh-server and python3-psycopg2).
The packages' services are not started: on a machine with systemd, installing openssh-server
would start the system's sshd on port 22, postgresql-15 a cluster on 5432 and pgbouncer a pooler
on 6432, none of which the project uses. While apt-get runs, a policy-rc.d that denies every start
(exit 101, the Debian policy interface that invoke-rc.d and deb-systemd-invoke consult) is in
place, unless the machine already has a policy-rc.d of its own (a container's, an administrator's,
a symlink): that one is left alone. The units are still enabled as the packages ship them, so they
start at the next boot; nothing here disables a machine's units. One install at a time (a lock
file in /run: two at once would remove each other's policy). A SIGTERM, SIGHUP or Ctrl-C ends
apt-get's whole process group (dpkg and its scripts), waits for it, then removes the policy.
Standard library only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Where only root writes (installs are root's anyway), whatever TMPDIR says.
LOCK = Path("/run/arrakis-ledger-debian-packages.lock")
# The first lines of the policy this script writes: a file that starts so is ours to remove (also when a
# killed install left it behind); any other policy-rc.d is the machine's.
POLICY = "#!/bin/sh\n# arrakis-ledger: no service starts while its packages install (scripts/debian_packages.py)\nexit 101\n"


class PackageError(Exception):
    """apt-get is not usable here or failed: the message says what to run by hand."""


def _leave(signum, _frame):
    raise SystemExit(128 + signum)


@contextmanager
def _one_at_a_time(lock: Path):
    """Another install's policy stays until its apt-get is done: wait for it, saying so."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another install of Debian packages to end (it holds {lock})", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def services_held(policy: Path = POLICY_RC_D, lock: Path = LOCK):
    """No package service starts inside this block: a deny-all policy-rc.d unless the machine has one."""
    with _one_at_a_time(lock):
        # A symlink (dangling or not) is the machine's: exists() would follow it.
        ours = not os.path.lexists(policy) or (
            not policy.is_symlink() and policy.read_text(errors="replace").startswith(POLICY))
        previous = {}
        if ours:
            # A CI timeout's SIGTERM, a closed terminal's SIGHUP: the policy goes all the same (handlers can
            # only be set from the main thread).
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGTERM, signal.SIGHUP):
                    if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                        previous[signum] = signal.signal(signum, _leave)
            tmp = policy.with_name(policy.name + ".arrakis-ledger")
            tmp.write_text(POLICY)
            os.chmod(tmp, 0o755)
            os.replace(tmp, policy)
        try:
            yield ours
        finally:
            if ours:
                try:
                    policy.unlink()
                except FileNotFoundError:
                    pass
                for signum, handler in previous.items():
                    signal.signal(signum, handler)


def install(packages: list[str], what: str = "", policy: Path = POLICY_RC_D, lock: Path = LOCK) -> None:
    """apt-get update and install ``packages`` (root only), their services not started; PackageError if not.

    apt-get's own output goes to standard error as it comes (a PostgreSQL install takes minutes)."""
    names = " ".join(packages)
    by_hand = f"install them as root: apt-get update && apt-get install -y {names}"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PackageError(f"missing {names}{what}: {by_hand}")
    print(f"installing the Debian package(s) {names}{what} with apt-get (their services are not started)",
          file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with services_held(policy, lock):
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
            returncode = _run(cmd, env)
            if returncode != 0:
                raise PackageError(f"'{' '.join(cmd)}' failed (exit {returncode}; its output is above); {by_hand}")


_INTERRUPTS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


def _run(cmd: list[str], env: dict) -> int:
    """cmd's exit status; it runs in a process group of its own, which an interrupt (SIGTERM, SIGHUP, Ctrl-C)
    ends and waits for, dpkg and its maintainer scripts included, before the policy is removed."""
    # Held until the try below: an interrupt while Popen starts the child would leave its group running.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, start_new_session=True,
                                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, mask))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # an interrupt that came meanwhile is handled here
        return proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.monotonic() + 60
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        raise


def _group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still runs."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:  # a zombie has ended: only its reaping is left
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install", help="apt-get install the packages (root), their services not started")
    p_install.add_argument("packages", nargs="+")
    args = parser.parse_args(argv)
    try:
        install(args.packages)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
