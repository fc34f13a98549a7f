#!/usr/bin/env python3
"""Start and stop a throwaway PostgreSQL 15 cluster from the local binaries.

One implementation serves the three places that need a real server: the
`make sandbox` target, Molecule's shared create/destroy playbooks and the pytest
fixtures. Standard library only, so it runs before the virtualenv exists.

    pgcluster.py start --dir .sandbox --port 55432 [--db ledger] [--archive pgbackrest [--stanza sandbox]]
    pgcluster.py stop  --dir .sandbox
    pgcluster.py status --dir .sandbox

The cluster listens on 127.0.0.1 only, trusts loopback (it is a throwaway), and
holds the roles the runbook's pre-migration checklist expects: `arrakis_app`
(LOGIN, with a password kept in DIR/arrakis_app.password, mode 0600) and
`arrakis_admin` (BYPASSRLS).

With `--archive pgbackrest` the cluster archives its WAL to a local pgBackRest
repository beside its data (DIR/pgbackrest/: repo, log, lock and the config file
that every pgbackrest call of the project names with --config; nothing in /etc),
under the stanza `--stanza` (default `sandbox`), with a first full backup: what
`SANDBOX_ARCHIVE=pgbackrest make sandbox` starts, for `backup_method=pgbackrest`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import debian_packages  # the one home of installing what is missing
from port_block import free_port, port_in_use  # the one home of the free-port rule

PG_MAJOR = "15"
DEFAULT_BINDIR = f"/usr/lib/postgresql/{PG_MAJOR}/bin"
RUN_AS = "postgres"  # initdb refuses to run as root


class ClusterError(Exception):
    """A failure with a message meant for the operator, not a traceback."""


def find_bindir() -> Path:
    candidates = [os.environ.get("PG_BINDIR", ""), DEFAULT_BINDIR]
    for cand in candidates:
        if cand and (Path(cand) / "initdb").is_file():
            return Path(cand)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        version = subprocess.run([pg_config, "--version"], capture_output=True, text=True, check=False)
        if (bindir / "initdb").is_file() and f" {PG_MAJOR}." in version.stdout:
            return bindir
    # The contract: where no binaries are found, install the Debian package as root.
    try:
        debian_packages.install([f"postgresql-{PG_MAJOR}"],
                                f" (PostgreSQL {PG_MAJOR} binaries: looked in $PG_BINDIR, {DEFAULT_BINDIR}, pg_config)")
    except debian_packages.PackageError as exc:
        raise ClusterError(f"{exc}; or set PG_BINDIR") from None
    if (Path(DEFAULT_BINDIR) / "initdb").is_file():
        return Path(DEFAULT_BINDIR)
    raise ClusterError(f"postgresql-{PG_MAJOR} is installed but {DEFAULT_BINDIR}/initdb is not there: set PG_BINDIR")


def _owner_env():
    """How to run server binaries: as `postgres` when we are root, as ourselves otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError as exc:
        raise ClusterError(
            f"running as root, but there is no '{RUN_AS}' user to run initdb as; "
            f"install postgresql-{PG_MAJOR} (it creates the user) or run as an ordinary user"
        ) from exc


def _run(cmd: list[str], *, check: bool = True, stdin: str | None = None,
         timeout: float | None = 120) -> subprocess.CompletedProcess:
    name = os.path.basename(cmd[0])
    if _owner_env() is not None:
        cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd="/", input=stdin)
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout or "").strip()
        raise ClusterError(f"{name} failed: {detail}")
    return res


def _state_file(base: Path) -> Path:
    return base / "cluster.json"


def read_state(base: Path) -> dict | None:
    try:
        return json.loads(_state_file(base).read_text())
    except (OSError, ValueError):
        return None


def remembered_port(base: Path) -> int:
    """SANDBOX_PORT when set, else the port the sandbox in `base` last started on (cluster.json), else 55432.

    `make migrate SANDBOX_PORT=56123` and a later bare `ansible-playbook ... -l local` (whose
    inventory/local reads the same cluster.json) then reach the same sandbox.
    """
    if os.environ.get("SANDBOX_PORT"):
        return int(os.environ["SANDBOX_PORT"])
    state = read_state(base.resolve()) or {}
    return int(state.get("port") or 55432)


def server_home(base: Path) -> Path:
    """Where the data directory, socket and log live for the cluster described by `base`.

    Normally `base` itself. When we are root and the `postgres` user cannot reach
    `base` (a checkout under /root, Molecule's ~/.cache), the server files go to
    /var/tmp/ledger-pg-<hash of base> instead; `base` keeps the state file.
    """
    base = base.resolve()
    state = read_state(base)
    if state and state.get("home"):
        return Path(state["home"])
    if _owner_env() is None:
        return base
    # start() creates `base` and gives it to `postgres`: what matters is whether that
    # user can pass through every directory above it.
    probe = base.parent
    while not probe.exists():
        probe = probe.parent
    res = subprocess.run(["runuser", "-u", RUN_AS, "--", "test", "-x", str(probe)], capture_output=True, check=False)
    if res.returncode == 0:
        return base
    digest = hashlib.sha256(str(base).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"ledger-pg-{digest}"


def is_running(base: Path) -> bool:
    return _postmaster_running(server_home(base))


def _postmaster_running(home: Path) -> bool:
    pid_file = home / "data" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def psql(bindir: Path, base: Path, port: int, sql: str, db: str = "postgres") -> str:
    """Run SQL as the superuser over the cluster's socket; SQL goes on stdin, never on a command line."""
    res = _run([str(bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(base), "-p", str(port),
                "-U", "postgres", "-d", db], stdin=sql)
    return res.stdout.strip()


ROLES_SQL = """
DO $roles$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'arrakis_app') THEN
    CREATE ROLE arrakis_app LOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'arrakis_admin') THEN
    CREATE ROLE arrakis_admin BYPASSRLS;
  END IF;
END
$roles$;
"""


PGBACKREST = "pgbackrest"


def find_pgbackrest() -> str:
    """The pgbackrest binary; installed with apt-get as root where missing (as postgresql-15 is).

    LEDGER_PGBACKREST_BIN names another one (scripts/pgbackrest_newer.py's, for block incremental).
    """
    chosen = os.environ.get("LEDGER_PGBACKREST_BIN")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise ClusterError(f"LEDGER_PGBACKREST_BIN={chosen} is not an executable file")
        return chosen
    found = shutil.which(PGBACKREST)
    if found:
        return found
    try:
        debian_packages.install([PGBACKREST])
    except debian_packages.PackageError as exc:
        raise ClusterError(f"{exc}; or start the sandbox without SANDBOX_ARCHIVE=pgbackrest") from None
    found = shutil.which(PGBACKREST)
    if found:
        return found
    raise ClusterError("pgbackrest is installed but not on PATH: set LEDGER_PGBACKREST_BIN")


def block_incremental(binary: str) -> bool:
    """Whether `binary` has block incremental (repo-block, generally available from pgBackRest 2.46)."""
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"pgBackRest (\d+)\.(\d+)", out)
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= (2, 46)


def pgbackrest_paths(home: Path) -> dict:
    root = home / "pgbackrest"
    return {"root": root, "config": root / "pgbackrest.conf", "repo": root / "repo", "log": root / "log",
            "lock": root / "lock", "spool": root / "spool"}


def _setup_pgbackrest(home: Path, data: Path, port: int, stanza: str) -> dict:
    """Write the repository's config and the server's archive settings (both rewritten on each
    start: the port may change; postgresql.conf includes the settings' file once)."""
    binary = find_pgbackrest()
    paths = pgbackrest_paths(home)
    owner = _owner_env()
    for key in ("root", "repo", "log", "lock", "spool"):
        paths[key].mkdir(mode=0o750, exist_ok=True)
        if owner is not None:
            os.chown(paths[key], owner.pw_uid, owner.pw_gid)
    # A throwaway repository: lz4 and 2 processes favour speed over size; two fulls are kept.
    # Block incremental from the full on, where the binary has it (most efficient so).
    block = "repo1-bundle=y\nrepo1-block=y\n" if block_incremental(binary) else ""
    paths["config"].write_text(
        "[global]\n"
        f"repo1-path={paths['repo']}\nrepo1-retention-full=2\n{block}"
        f"log-path={paths['log']}\nlock-path={paths['lock']}\nspool-path={paths['spool']}\n"
        "log-level-file=info\nlog-level-console=warn\nstart-fast=y\ncompress-type=lz4\nprocess-max=2\n"
        f"\n[{stanza}]\npg1-path={data}\npg1-port={port}\npg1-socket-path={home}\n")
    os.chmod(paths["config"], 0o640)
    if owner is not None:
        os.chown(paths["config"], owner.pw_uid, owner.pw_gid)
    archive_command = f"{binary} --config={paths['config']} --stanza={stanza} archive-push %p"
    return {"stanza": stanza, "config": str(paths["config"]), "binary": binary,
            "settings": {"archive_mode": "on", "archive_command": archive_command, "wal_level": "replica"}}


def pgbackrest(info: dict, *args: str, timeout: float = 600) -> None:
    """Run pgbackrest for a cluster's repository ({config, stanza} of its state) as the cluster's owner."""
    _run([info.get("binary") or find_pgbackrest(), f"--config={info['config']}", f"--stanza={info['stanza']}", *args],
         timeout=timeout)


def start(base: Path, port: int, db: str, archive: str | None = None, stanza: str = "sandbox") -> dict:
    base = base.resolve()
    bindir = find_bindir()
    owner = _owner_env()
    state = read_state(base)
    home = server_home(base)
    if is_running(base):
        if state and state.get("port") != port:
            print(f"cluster in {base} already running on port {state['port']} (asked for {port}); "
                  f"stop it first with 'make sandbox-stop'", file=sys.stderr)
        return state or {}
    if port_in_use(port):
        raise ClusterError(
            f"port {port} on 127.0.0.1 is already in use by another program; "
            f"choose another with SANDBOX_PORT=NNNNN (e.g. 'make sandbox SANDBOX_PORT={free_port()}')"
        )
    base.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    if owner is not None:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    data = home / "data"
    if not (data / "PG_VERSION").exists():
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
              "-E", "UTF8", "--locale=C.UTF-8"])
        conf = data / "postgresql.conf"
        # Throwaway cluster: loopback only, socket kept beside the data, durability traded for speed.
        extra = (
            "\n# pgcluster.py\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{home}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "max_connections = 100\n"
            "shared_buffers = 128MB\n"
            "log_min_messages = warning\n"
        )
        _append_as_owner(conf, extra)
    archive_info = None
    if archive == "pgbackrest" or (state or {}).get("pgbackrest"):
        stanza = ((state or {}).get("pgbackrest") or {}).get("stanza", stanza)
        archive_info = _setup_pgbackrest(home, data, port, stanza)
        settings = data / "ledger_archive.conf"
        settings.write_text("# pgcluster.py --archive pgbackrest (rewritten at each start)\n"
                            + "".join(f"{k} = '{v}'\n" for k, v in archive_info["settings"].items()))
        if owner is not None:
            os.chown(settings, owner.pw_uid, owner.pw_gid)
        include = "include_if_exists = 'ledger_archive.conf'\n"
        if include not in (data / "postgresql.conf").read_text():
            _append_as_owner(data / "postgresql.conf", include)
    log = home / "server.log"
    res = _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", f"-p {port}", "-w", "-t", "60", "start"],
               check=False)
    if res.returncode != 0:
        tail = ""
        try:
            tail = "\n".join(log.read_text().splitlines()[-5:])
        except OSError:
            pass
        raise ClusterError(f"PostgreSQL did not start on port {port}: {(res.stderr or res.stdout).strip()}\n{tail}")
    psql(bindir, home, port, ROLES_SQL)
    pw_file = base / "arrakis_app.password"
    if not pw_file.exists():
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    password = pw_file.read_text().strip()
    # Sent on psql's stdin (see psql()): the password never appears in a process listing.
    psql(bindir, home, port, f"ALTER ROLE arrakis_app PASSWORD '{password}'")
    exists = psql(bindir, home, port, f"SELECT 1 FROM pg_database WHERE datname = '{db}'")
    if not exists:
        psql(bindir, home, port, f'CREATE DATABASE "{db}"')
    state = {"dir": str(base), "home": str(home), "port": port, "db": db, "bindir": str(bindir),
             "url": f"postgresql://postgres@127.0.0.1:{port}/{db}",
             "os_user": owner.pw_name if owner is not None else pwd.getpwuid(os.geteuid()).pw_name}
    if archive_info:
        repo = pgbackrest_paths(home)["repo"]
        if not (repo / "backup" / archive_info["stanza"] / "backup.info").exists():
            # The stanza and a first full backup: the base every restore point builds on.
            pgbackrest(archive_info, "stanza-create")
            pgbackrest(archive_info, "check")
            pgbackrest(archive_info, "--type=full", "backup")
        state["pgbackrest"] = {"stanza": archive_info["stanza"], "config": archive_info["config"],
                               "binary": archive_info["binary"]}
    _state_file(base).write_text(json.dumps(state, indent=2) + "\n")
    return state


def _append_as_owner(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


def stop(base: Path, mode: str = "fast", home: Path | None = None) -> None:
    """Stop the server (pg_ctl -m `mode`). `home`: where its files are, when known (a base whose
    state file is gone cannot tell). "immediate" suits a cluster about to be removed: a fast
    shutdown of an archiving cluster first waits for pgBackRest to push every WAL segment left."""
    home = Path(home) if home else server_home(base.resolve())
    if not _postmaster_running(home):
        return
    bindir = find_bindir()
    _run([str(bindir / "pg_ctl"), "-D", str(home / "data"), "-m", mode, "-w", "-t", "60", "stop"])


def destroy(base: Path, mode: str = "fast", home: Path | None = None) -> None:
    base = base.resolve()
    home = Path(home) if home else server_home(base)
    stop(base, mode, home)
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "destroy", "status", "port", "install-pgbackrest"])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=None,
                        help="default: SANDBOX_PORT, else the port this sandbox last ran on, else 55432")
    parser.add_argument("--db", default="ledger")
    parser.add_argument("--archive", choices=["", "pgbackrest"], default=os.environ.get("SANDBOX_ARCHIVE", ""),
                        help="archive WAL to a local pgBackRest repository (default: $SANDBOX_ARCHIVE)")
    parser.add_argument("--stanza", default="sandbox")
    args = parser.parse_args(argv)
    if args.port is None:
        args.port = remembered_port(args.dir)
    try:
        if args.action == "install-pgbackrest":
            print(f"pgbackrest: {find_pgbackrest()}")
        elif args.action == "port":
            print(args.port)
        elif args.action == "start":
            state = start(args.dir, args.port, args.db, archive=args.archive or None, stanza=args.stanza)
            print(f"PostgreSQL {PG_MAJOR} sandbox running: {state.get('url')} (data in {args.dir})")
            if state.get("pgbackrest"):
                print(f"WAL archived by pgBackRest: stanza {state['pgbackrest']['stanza']}, "
                      f"config {state['pgbackrest']['config']}")
        elif args.action == "stop":
            stop(args.dir)
            print(f"PostgreSQL sandbox in {args.dir} stopped")
        elif args.action == "destroy":
            destroy(args.dir)
            print(f"PostgreSQL sandbox in {args.dir} removed")
        else:
            running = is_running(args.dir.resolve())
            print(json.dumps({"running": running, **(read_state(args.dir.resolve()) or {})}))
            return 0 if running else 3
    except ClusterError as exc:
        print(f"pgcluster: {exc}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired as exc:
        print(f"pgcluster: timed out running {exc.cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
