#!/usr/bin/env python3
"""A pgBackRest newer than Debian 12's 2.45, for block incremental backups (repo-block needs 2.46).

    pgbackrest_newer.py [--version 2.55.1-1] [--cache ~/.cache/arrakis-ledger]   # prints the binary's path

`make pgbackrest-newer` runs it. The binary is cached in
~/.cache/arrakis-ledger/pgbackrest-<version>/usr/bin/pgbackrest (XDG_CACHE_HOME is honoured;
as root, whose home the cluster's OS user cannot enter, /var/cache/arrakis-ledger/...);
point the benchmark and the sandbox at it with LEDGER_PGBACKREST_BIN=<that path>, and a target's
inventory with pgbackrest_bin. A production host installs the PGDG package instead
(apt.postgresql.org ships the current pgBackRest for Debian 12); this is for development here.

Where it comes from: Debian trixie's own package, fetched and verified by apt-get (the Release
file's signature from debian-archive-keyring, then the package's SHA-256) with a private
sources list and private state under the cache directory (nothing of the system's apt
configuration changes), then unpacked with dpkg-deb (not installed: Debian's 2.45 stays the
system's pgbackrest, the one CI uses). It is trixie's build, linked against sonames that
Debian 12 has (glibc >= 2.34, libssl3, libpq5, libzstd1, ...): the script refuses it when
`ldd -r` reports a missing library or symbol, or when `pgbackrest version` fails.

Why not a build from Debian's source: the mirror reachable from this machine answers 404 for
pgbackrest_2.55.1-1.dsc, pgbackrest_2.55.1.orig.tar.gz and pgbackrest_2.55.1-1.debian.tar.xz
(while it serves 2.45's source and 2.55.1's .deb), so `apt-get source pgbackrest=2.55.1-1`
cannot fetch it. Where the source is reachable, `apt-get source` and a meson build
(build dependencies in debian/control) give the same binary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
VERSION = "2.55.1-1"


class FetchError(Exception):
    pass


def cache_root(given: str | None) -> Path:
    """~/.cache/arrakis-ledger, unless the cluster's OS user could not reach it there.

    archive_command runs the binary as postgres: under root's home (mode 0700) it could not,
    so root caches it in /var/cache/arrakis-ledger instead.
    """
    if given:
        return Path(given).expanduser()
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arrakis-ledger"
    if os.geteuid() == 0 and not all(os.stat(p).st_mode & 0o001 for p in [*home.parents][:-1] if p.exists()):
        return Path("/var/cache/arrakis-ledger")
    return home


def _apt_options(state: Path) -> list[str]:
    """apt-get options for a private sources list and state: the system's apt is left alone."""
    return ["-o", f"Dir::Etc::SourceList={state / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "Dir::State::Status=/var/lib/dpkg/status", "-o", "APT::Sandbox::User=root" if os.geteuid() == 0
            else "Debug::NoLocking=1", "-q"]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise FetchError(f"{' '.join(cmd[:2])} ... failed (exit {res.returncode}): "
                         f"{(res.stderr or res.stdout).strip().splitlines()[-3:]}")
    return res.stdout


def fetch(version: str, root: Path) -> Path:
    target = root / f"pgbackrest-{version}"
    binary = target / "usr" / "bin" / "pgbackrest"
    if binary.is_file() and usable(binary):
        return binary
    for tool in ("apt-get", "dpkg-deb", "ldd"):
        if not shutil.which(tool):
            raise FetchError(f"{tool} not found: this script fetches Debian's package and needs a Debian host")
    state = root / f"apt-{SUITE}"
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
    opts = _apt_options(state)
    print(f"fetching pgbackrest {version} (Debian {SUITE}) with apt-get into {root}", file=sys.stderr)
    _run(["apt-get", *opts, "update"])
    with tempfile.TemporaryDirectory(prefix="pgbackrest-", dir=root) as tmp:
        tmpdir = Path(tmp)
        _run(["apt-get", *opts, "download", f"pgbackrest={version}"], cwd=tmpdir)
        debs = list(tmpdir.glob("pgbackrest_*.deb"))
        if len(debs) != 1:
            raise FetchError(f"apt-get download left {len(debs)} packages in {tmpdir}")
        unpacked = tmpdir / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        candidate = unpacked / "usr" / "bin" / "pgbackrest"
        missing = [line.strip() for line in _run(["ldd", "-r", str(candidate)]).splitlines()
                   if "not found" in line or "undefined symbol" in line]
        if missing:
            raise FetchError(f"Debian {SUITE}'s pgbackrest {version} does not run here: {missing[:3]}")
        if not usable(candidate):
            raise FetchError(f"{candidate} version failed")
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    os.chmod(root, 0o755)  # the cluster's OS user (postgres) runs the binary
    for parent in (target, target / "usr", target / "usr" / "bin"):
        os.chmod(parent, 0o755)
    return binary


def usable(binary: Path) -> bool:
    res = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=False)
    return res.returncode == 0 and res.stdout.startswith("pgBackRest ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=VERSION, help=f"Debian {SUITE}'s package version (default {VERSION})")
    parser.add_argument("--cache", help="cache directory (default ~/.cache/arrakis-ledger)")
    args = parser.parse_args(argv)
    try:
        binary = fetch(args.version, cache_root(args.cache))
    except FetchError as exc:
        print(f"pgbackrest_newer.py: {exc}", file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
