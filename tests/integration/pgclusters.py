"""The PostgreSQL clusters a test process starts: on a free port, registered to the process, swept once it died.

Every test cluster goes through start() and destroy() here (the session's cluster in conftest,
and any module that needs a server of its own). start() writes a registry entry first (this
process's pid and start time, the cluster's base and server home), then starts the server on a
free port (scripts/port_block.py's rule); destroy() removes both.

A test run killed mid-way (CI timeout, Ctrl-C twice, an OOM kill) never runs its finalizers:
its clusters keep running, and under root their files stay in /var/tmp/ledger-pg-*. The first
start() of each process sweeps the registry: an entry whose process is gone (its pid is free,
or now belongs to another process started at another time) has its server stopped and its
files removed. A live process's clusters are never touched, whichever checkout it runs from;
clusters started by anything else (make sandbox, Molecule, bench) are never in the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pgcluster
from port_block import free_port

REGISTRY = Path(tempfile.gettempdir()) / f"ledger-pytest-clusters-{os.getuid()}"
_swept = False


def _started_at(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if it is gone.

    A pid alone is not an identity: the kernel reuses them."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _entry(base: Path) -> Path:
    return REGISTRY / (hashlib.sha256(str(base).encode()).hexdigest()[:16] + ".json")


@contextlib.contextmanager
def _registry_lock():
    REGISTRY.mkdir(mode=0o700, exist_ok=True)
    with open(REGISTRY / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def sweep() -> list[str]:
    """Stop and remove the registered clusters of dead processes; return their bases."""
    removed = []
    with _registry_lock():
        for path in sorted(REGISTRY.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if _started_at(entry["pid"]) == entry["started_at"]:
                continue  # its owner is alive: its cluster is in use
            try:
                pgcluster.destroy(Path(entry["base"]), mode="immediate", home=Path(entry["home"]))
            except pgcluster.ClusterError:
                continue  # could not stop it: keep the entry, the next sweep tries again
            if entry.get("tmpdir"):
                shutil.rmtree(entry["tmpdir"], ignore_errors=True)
            path.unlink(missing_ok=True)
            removed.append(entry["base"])
    return removed


def start(base: Path, db: str = "ledger", tmpdir: Path | None = None, **kw) -> dict:
    """Start a cluster in `base` (pgcluster.start's keyword arguments) on a free port; its state.

    `tmpdir`: a directory holding `base` that a sweep removes along with it."""
    global _swept
    if not _swept:
        _swept = True
        sweep()
    base = Path(base).resolve()
    with _registry_lock():
        _entry(base).write_text(json.dumps({
            "pid": os.getpid(), "started_at": _started_at(os.getpid()), "base": str(base),
            "home": str(pgcluster.server_home(base)), "tmpdir": str(tmpdir) if tmpdir else None}))
    # Two processes may draw the same free port at the same moment: the loser's server cannot bind.
    for attempt in range(3):
        port = free_port()
        try:
            return pgcluster.start(base, port, db, **kw)
        except pgcluster.ClusterError as exc:
            if attempt == 2 or str(port) not in str(exc):
                raise
            pgcluster.stop(base, mode="immediate")


def destroy(base: Path) -> None:
    """Stop the cluster at once (its data is thrown away) and remove its files and registry entry."""
    base = Path(base).resolve()
    pgcluster.destroy(base, mode="immediate")
    with _registry_lock():
        _entry(base).unlink(missing_ok=True)
