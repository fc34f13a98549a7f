#!/usr/bin/env python3
"""A private OpenSSH server: how the tests reach "the database host" the way production does.

    sshd_ctl.py install                        # openssh-server and python3-psycopg2 from Debian (as root)
    sshd_ctl.py start --dir D --port P --authorized-key KEY.pub
    sshd_ctl.py stop --dir D

With backup_method=pgbackrest the pgBackRest tasks run on the database server (pgbackrest_host),
reached over SSH with become to the cluster's OS user. The tests start an sshd of their own:
loopback only, on a free port, with its own host key (D/host_ed25519), one authorized key (a
throwaway pair) and no password login; it runs in the foreground of its own process (-D), so
stopping it is killing that one pid (D/sshd.pid). The module runs there with the host's
/usr/bin/python3, which needs psycopg2: a database host has python3-psycopg2 (Debian), as
`install` sets up here. Nothing in /etc/ssh is changed and no system sshd is started
(`install` holds the package's services: scripts/debian_packages.py; `start` never uses
/etc/ssh/sshd_config).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import debian_packages  # the one home of installing what is missing

SSHD = "/usr/sbin/sshd"
PACKAGES = {"openssh-server": lambda: os.access(SSHD, os.X_OK),
            "python3-psycopg2": lambda: subprocess.run(["/usr/bin/python3", "-c", "import psycopg2"],
                                                       capture_output=True, check=False).returncode == 0}


class SshdError(Exception):
    pass


def missing() -> list[str]:
    return [name for name, present in PACKAGES.items() if not present()]


def install() -> None:
    """Install what is missing with apt-get (root only), as pgbouncer and pgbackrest are."""
    need = missing()
    if not need:
        return
    try:
        debian_packages.install(need)
    except debian_packages.PackageError as exc:
        raise SshdError(str(exc)) from None
    if missing():
        raise SshdError(f"still missing after apt-get: {', '.join(missing())}")


def keypair(path: Path) -> Path:
    """An ed25519 key pair at path (and path.pub), without a passphrase."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ledger-test", "-f", str(path)],
                       check=True, capture_output=True)
    return path


def start(directory: Path, port: int, authorized_key: Path, timeout: float = 30.0) -> dict:
    """Start sshd on 127.0.0.1:port; returns {pid, port, known_hosts}."""
    if not os.access(SSHD, os.X_OK):
        raise SshdError(f"{SSHD} not found: run 'python3 scripts/sshd_ctl.py install' as root")
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    host_key = keypair(directory / "host_ed25519")
    auth = directory / "authorized_keys"
    auth.write_text(Path(authorized_key).read_text())
    os.chmod(auth, 0o600)
    config = directory / "sshd_config"
    # StrictModes off: the files live in a temporary directory, not in a home directory sshd would check.
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {directory / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\nMaxStartups 50\nMaxSessions 50\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = open(directory / "sshd.log", "ab")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, start_new_session=True)
    log.close()
    (directory / "sshd.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SshdError(f"sshd exited ({proc.returncode}): {(directory / 'sshd.log').read_text()[-400:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                stop(directory)
                raise SshdError(f"sshd did not listen on 127.0.0.1:{port} within {timeout} s")
            time.sleep(0.1)
    known = directory / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {(directory / 'host_ed25519.pub').read_text().split(' ')[0]} "
                     f"{(directory / 'host_ed25519.pub').read_text().split(' ')[1]}\n")
    return {"pid": proc.pid, "port": port, "known_hosts": str(known)}


def _children(pid: int) -> list[int]:
    """The processes below pid (sshd's per-connection processes start sessions of their own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def stop(directory: Path) -> None:
    """Stop the sshd started in directory (its own pid) and the connections it forked, nothing else."""
    pid_file = Path(directory) / "sshd.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for victim in _children(pid) + [pid]:
        try:
            os.kill(victim, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "start", "stop"])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--authorized-key", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            install()
            print("sshd and python3-psycopg2: present")
        elif args.action == "start":
            if not (args.dir and args.port and args.authorized_key):
                parser.error("start needs --dir, --port and --authorized-key")
            print(start(args.dir, args.port, args.authorized_key))
        else:
            if not args.dir:
                parser.error("stop needs --dir")
            stop(args.dir)
    except SshdError as exc:
        print(f"sshd_ctl.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
