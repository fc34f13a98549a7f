#!/usr/bin/env python3
"""Start and stop a throwaway PgBouncer in transaction pooling mode in front of a PostgreSQL.

The staging checklist asks that the ledger be "PgBouncer transaction mode compatible
(SET LOCAL, not SET)". This helper runs a real PgBouncer (the Debian package) so that
pytest and the Molecule `pgbouncer` scenario can prove it. Standard library only.

    pgbouncer_ctl.py start  --dir D --pg-port 55432 [--port N] [--pool-size 1]
                            [--auth trust|md5] [--user NAME[:PASSWORD]]... [--install]
    pgbouncer_ctl.py stop   --dir D
    pgbouncer_ctl.py status --dir D
    pgbouncer_ctl.py url    --dir D [--user postgres] [--db ledger]

* pool_mode = transaction (session only with --pool-mode session, for negative tests);
  default_pool_size = --pool-size (1 in the tests, so two
  clients' transactions are bound to share one server connection: a context that
  leaked from one transaction would be seen by the next client's);
* server_reset_query = DISCARD ALL with server_reset_query_always = 1: every server
  connection is reset after each client transaction, so a client's session-level
  `SET app.community_id` (or set_config(..., false)) can never reach another client's
  transaction (the ledger's guarantee 7; precheck refuses a PgBouncer without it).
  --leaky drops both, only to show in tests what they prevent;
* listens on 127.0.0.1 only, on --port or a free port; every database name is
  forwarded to the PostgreSQL on --pg-host/--pg-port (a `*` fallback entry);
* auth_type trust (users must still be listed) or md5, with a userlist generated
  in the run directory (mode 0600); `postgres` is admin_users and stats_users, so
  `psql -p PORT -U postgres pgbouncer -c 'SHOW POOLS'` works;
* PgBouncer refuses to run as root: when we are root it runs as the `postgres`
  user (the run directory moves to /var/tmp when that user cannot reach --dir);
* the state (port, pid, run directory) is kept in D/pgbouncer.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import debian_packages  # the one home of installing what is missing
from port_block import free_port, port_in_use  # the one home of the free-port rule

RUN_AS = "postgres"
DEFAULT_USERS = ("postgres", "arrakis_app")
STATE_FILE = "pgbouncer.json"


class BouncerError(Exception):
    """A failure with a message meant for the operator, not a traceback."""


def find_binary(install: bool = False) -> str:
    """The pgbouncer executable; with install=True and root, install the Debian package when missing."""
    for cand in (os.environ.get("PGBOUNCER_BIN", ""), shutil.which("pgbouncer") or "", "/usr/sbin/pgbouncer"):
        if cand and os.access(cand, os.X_OK):
            return cand
    if not install:
        raise BouncerError("pgbouncer is not installed: run 'apt-get update && apt-get install -y pgbouncer' as root "
                           "(or pass --install), or set PGBOUNCER_BIN")
    try:
        debian_packages.install(["pgbouncer"])
    except debian_packages.PackageError as exc:
        raise BouncerError(f"{exc}; or set PGBOUNCER_BIN") from None
    if os.access("/usr/sbin/pgbouncer", os.X_OK):
        return "/usr/sbin/pgbouncer"
    raise BouncerError("pgbouncer is installed but /usr/sbin/pgbouncer is not there: set PGBOUNCER_BIN")


def _owner():
    """The account pgbouncer runs as: `postgres` when we are root, ourselves otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError as exc:
        raise BouncerError(f"running as root, but there is no '{RUN_AS}' user to run pgbouncer as "
                           "(pgbouncer refuses root); install postgresql or run as an ordinary user") from exc


def read_state(base: Path) -> dict | None:
    try:
        return json.loads((Path(base) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _run_home(base: Path) -> Path:
    """Where pgbouncer.ini, the userlist, the pid file and the log live."""
    owner = _owner()
    if owner is None:
        return base
    probe = base
    while not probe.exists():
        probe = probe.parent
    res = subprocess.run(["runuser", "-u", RUN_AS, "--", "test", "-w", str(probe), "-a", "-x", str(probe)],
                         capture_output=True, check=False)
    if res.returncode == 0:
        return base
    return Path("/var/tmp") / ("ledger-pgbouncer-" + hashlib.sha256(str(base).encode()).hexdigest()[:12])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited daemon stays a zombie until init reaps it: that is stopped
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(home: Path) -> int | None:
    try:
        return int((home / "pgbouncer.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_running(base: Path) -> bool:
    state = read_state(Path(base).resolve())
    if not state:
        return False
    pid = _read_pid(Path(state["home"]))
    return bool(pid and _pid_alive(pid))


def _md5_secret(user: str, password: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324 - PgBouncer's md5 format


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def parse_users(specs) -> dict:
    """`NAME` or `NAME:PASSWORD` strings -> {name: password or ''}."""
    users = {}
    for spec in specs or DEFAULT_USERS:
        name, _, password = spec.partition(":")
        if not name:
            raise BouncerError(f"bad --user {spec!r}: expected NAME or NAME:PASSWORD")
        users[name] = password
    return users


def start(base: Path, pg_port: int, *, pg_host: str = "127.0.0.1", port: int | None = None, pool_size: int = 1,
          auth: str = "trust", users: dict | None = None, admin: str = "postgres", install: bool = False,
          query_wait_timeout: int = 30, pool_mode: str = "transaction", leaky: bool = False) -> dict:
    """Start pgbouncer (or return the state of the one already running for `base`)."""
    base = Path(base).resolve()
    if is_running(base):
        return read_state(base)
    if auth not in ("trust", "md5"):
        raise BouncerError(f"--auth must be trust or md5 (got {auth!r})")
    if pool_mode not in ("transaction", "session"):
        raise BouncerError(f"--pool-mode must be transaction or session (got {pool_mode!r})")
    binary = find_binary(install=install)
    users = dict(users) if users else parse_users(None)
    users.setdefault(admin, "")
    if auth == "md5" and not all(users.values()):
        raise BouncerError("auth md5 needs a password for every user (--user NAME:PASSWORD)")
    port = port or free_port()
    if port_in_use(port):
        raise BouncerError(f"port {port} on 127.0.0.1 is already in use; choose another with --port")
    if not port_in_use(pg_port, pg_host):
        raise BouncerError(f"no PostgreSQL listening on {pg_host}:{pg_port}; start it first "
                           f"(e.g. 'scripts/pgcluster.py start --dir .sandbox --port {pg_port}')")
    base.mkdir(parents=True, exist_ok=True)
    home = _run_home(base)
    home.mkdir(parents=True, exist_ok=True)
    owner = _owner()

    lines = []
    for name, password in sorted(users.items()):
        secret = _md5_secret(name, password) if (auth == "md5" and password) else password
        lines.append(f"{_quote(name)} {_quote(secret)}")
    userlist = home / "userlist.txt"
    fd = os.open(userlist, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    ini = home / "pgbouncer.ini"
    ini.write_text(
        "; generated by scripts/pgbouncer_ctl.py (throwaway, loopback only)\n"
        "[databases]\n"
        f"* = host={pg_host} port={pg_port}\n"
        "\n[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        f"unix_socket_dir = {home}\n"
        f"auth_type = {auth}\n"
        f"auth_file = {userlist}\n"
        f"admin_users = {admin}\n"
        f"stats_users = {admin}\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {pool_size}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        "max_client_conn = 200\n"
        f"query_wait_timeout = {query_wait_timeout}\n"
        "server_login_retry = 1\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        # The tenant context never outlives a client's transaction (see the docstring).
        + ("" if leaky else "server_reset_query = DISCARD ALL\nserver_reset_query_always = 1\n") +
        f"logfile = {home / 'pgbouncer.log'}\n"
        f"pidfile = {home / 'pgbouncer.pid'}\n"
    )
    os.chmod(ini, 0o600)
    if owner is not None:
        for path in (home, ini, userlist):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(home, 0o700)
    (home / "pgbouncer.pid").unlink(missing_ok=True)

    cmd = [binary, "-d", "-q", str(ini)]
    if owner is not None:
        cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/", timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not port_in_use(port):
        time.sleep(0.05)
    if res.returncode != 0 or not port_in_use(port):
        tail = ""
        try:
            tail = "\n".join((home / "pgbouncer.log").read_text().splitlines()[-5:])
        except OSError:
            pass
        raise BouncerError(f"pgbouncer did not start on port {port} (exit {res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()}\n{tail}".strip())
    pid = None
    for _ in range(100):
        pid = _read_pid(home)
        if pid:
            break
        time.sleep(0.05)
    state = {"dir": str(base), "home": str(home), "port": port, "pid": pid, "pg_host": pg_host, "pg_port": pg_port,
             "pool_mode": pool_mode, "pool_size": pool_size, "leaky": leaky, "auth": auth, "admin": admin,
             "users": sorted(users)}
    (base / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return state


def stop(base: Path) -> None:
    """Stop the pgbouncer started for `base` (its own pid only) and remove its run directory."""
    base = Path(base).resolve()
    state = read_state(base)
    if not state:
        return
    home = Path(state["home"])
    pid = _read_pid(home) or state.get("pid")
    if pid and _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)  # immediate shutdown
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if home != base:
        shutil.rmtree(home, ignore_errors=True)
    for name in ("pgbouncer.ini", "userlist.txt", "pgbouncer.pid", STATE_FILE):
        (base / name).unlink(missing_ok=True)


def url(state: dict, user: str = "postgres", db: str = "ledger", password: str | None = None) -> str:
    auth = user if not password else f"{user}:{password}"
    return f"postgresql://{auth}@127.0.0.1:{state['port']}/{db}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "url", "install"])
    parser.add_argument("--dir", type=Path, help="the pgbouncer's state directory (all actions but install)")
    parser.add_argument("--pg-host", default="127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("SANDBOX_PORT", "55432")))
    parser.add_argument("--port", type=int, default=0, help="listen port (default: a free one)")
    parser.add_argument("--pool-size", type=int, default=1)
    parser.add_argument("--pool-mode", choices=["transaction", "session"], default="transaction",
                        help="session only to show what transaction pooling prevents (tests)")
    parser.add_argument("--leaky", action="store_true",
                        help="no server reset between clients (tests only: shows the leak it prevents)")
    parser.add_argument("--auth", choices=["trust", "md5"], default="trust")
    parser.add_argument("--user", action="append", help="NAME or NAME:PASSWORD (repeatable); "
                        "default: postgres, arrakis_app")
    parser.add_argument("--install", action="store_true", help="apt-get install pgbouncer when missing (root)")
    parser.add_argument("--db", default="ledger", help="database name for the url action")
    args = parser.parse_args(argv)
    if args.action != "install" and args.dir is None:
        parser.error(f"{args.action} needs --dir")
    try:
        if args.action == "install":
            # make test: the PgBouncer tests need the binary (installed as root, else a clear message).
            print(f"pgbouncer: {find_binary(install=True)}")
        elif args.action == "start":
            state = start(args.dir, args.pg_port, pg_host=args.pg_host, port=args.port or None,
                          pool_size=args.pool_size, auth=args.auth, users=parse_users(args.user),
                          install=args.install, pool_mode=args.pool_mode, leaky=args.leaky)
            print(f"pgbouncer (pool_mode={state['pool_mode']}, pool size {state['pool_size']}) on 127.0.0.1:{state['port']} "
                  f"in front of {state['pg_host']}:{state['pg_port']}: {url(state, db=args.db)}")
        elif args.action == "stop":
            stop(args.dir)
            print(f"pgbouncer of {args.dir} stopped")
        elif args.action == "url":
            state = read_state(args.dir.resolve())
            if not state:
                raise BouncerError(f"no pgbouncer state in {args.dir}; start it first")
            print(url(state, user=(args.user or ["postgres"])[0].partition(":")[0], db=args.db))
        else:
            running = is_running(args.dir)
            print(json.dumps({"running": running, **(read_state(args.dir.resolve()) or {})}))
            return 0 if running else 3
    except BouncerError as exc:
        print(f"pgbouncer_ctl: {exc}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired as exc:
        print(f"pgbouncer_ctl: timed out running {exc.cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
