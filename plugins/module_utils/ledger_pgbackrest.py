# -*- coding: utf-8 -*-
"""pgBackRest as a backup method: the command line, the repository's facts, restore points.

Shared by the `ledger_pgbackrest` module's three actions (check, backup, restore; the
restore's steps are in ledger_pgbackrest_pitr.py). pgBackRest runs on the database server,
as the cluster's OS user: the module runs there (the role delegates it to `pgbackrest_host`),
and when it runs as root it calls pgbackrest, pg_ctl and psql through `runuser -u <os user>`.
Every call names the stanza and, when given, the config file (`--config`): the sandbox's lives
under .sandbox/, never in /etc.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import shlex
import subprocess
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, redact
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import child_preexec

MANIFEST_KIND = "ledger-pitr"
MANIFEST_SUFFIX = ".pitr.json"
RESTORE_POINT_PREFIX = "ledger-"
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_VERSION = re.compile(r"pgBackRest (\d+)\.(\d+)")
# Block incremental (repo-block, with repo-bundle) is generally available from pgBackRest 2.46
# (2.45, Debian 12's, has it as a beta only): an incr then stores the changed blocks of a
# changed file, not the whole 1 GB segment.
BLOCK_INCREMENTAL_SINCE = (2, 46)


def parse_age(text):
    """Seconds of `7d`, `36h`, `90m`, `3600` (seconds) or `2w`; LedgerError otherwise."""
    match = _AGE.match(str(text))
    if not match:
        raise LedgerError("pgbackrest_max_age=%r is not an age: use e.g. 7d, 36h, 90m or a number of seconds" % text)
    return float(match.group(1)) * _AGE_UNITS[(match.group(2) or "s").lower()]


def human_age(seconds):
    seconds = int(max(seconds, 0))
    if seconds >= 86400:
        return "%dd %dh" % (seconds // 86400, seconds % 86400 // 3600)
    if seconds >= 3600:
        return "%dh %dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dm %ds" % (seconds // 60, seconds % 60) if seconds >= 60 else "%ds" % seconds


def restore_point_name(run_id):
    """`ledger-<run_id>`: the named restore point of a run (PostgreSQL allows 63 bytes)."""
    return (RESTORE_POINT_PREFIX + str(run_id))[:63]


def segment_le(a, b):
    """Whether WAL segment `a` is at or before `b` (same or later timeline of b counts as after)."""
    return bool(_SEGMENT.match(a or "")) and bool(_SEGMENT.match(b or "")) and (a[8:], a[:8]) <= (b[8:], b[:8])


class OsUser(object):
    """Runs commands as the cluster's OS user: directly when we are that user, via runuser as root."""

    def __init__(self, name):
        self.name = name or "postgres"
        try:
            self.pw = pwd.getpwnam(self.name)
        except KeyError:
            raise LedgerError("the cluster's OS user %r does not exist on this host (set pgbackrest_os_user)"
                              % self.name)
        me = os.geteuid()
        if me == self.pw.pw_uid:
            self.prefix = []
        elif me == 0:
            self.prefix = ["runuser", "-u", self.name, "--"]
        else:
            raise LedgerError(
                "this task runs as %s, not as the cluster's OS user %s nor root: reach the database host with "
                "become (pgbackrest_become: true, become_user %s) or set pgbackrest_os_user"
                % (pwd.getpwuid(me).pw_name, self.name, self.name))

    def spawn(self, argv, env=None, with_parent=False):
        """(command, environment, Popen keywords) to run argv as this user.

        with_parent: the command gets SIGKILL when this process dies (ledger_lifeline). As root the
        user is then switched by the child itself, not by runuser: runuser's own child (the command)
        would not inherit the death signal (it is cleared on fork and on a change of user).
        """
        full_env = dict(os.environ, **(env or {}))
        if not with_parent:
            return self.prefix + list(argv), full_env, {}
        kw = {"preexec_fn": child_preexec}
        if self.prefix:
            kw.update(user=self.pw.pw_uid, group=self.pw.pw_gid,
                      extra_groups=os.getgrouplist(self.name, self.pw.pw_gid))
            full_env.update(HOME=self.pw.pw_dir, USER=self.name, LOGNAME=self.name, SHELL=self.pw.pw_shell)
        return list(argv), full_env, kw

    def run(self, argv, timeout=None, check=True, stdin=None, on_line=None, env=None, with_parent=False):
        """(exit code, stdout, stderr); with on_line, stdout lines are handed over as they come."""
        cmd, full_env, kw = self.spawn(argv, env, with_parent)
        try:
            if on_line is None:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin,
                                     cwd="/", env=full_env, check=False, **kw)
                code, out, err = res.returncode, res.stdout, res.stderr
            else:
                code, out, err = _run_streaming(cmd, timeout, on_line, full_env, kw)
        except subprocess.TimeoutExpired:
            raise LedgerError("%s did not finish within %s s" % (os.path.basename(argv[0]), timeout))
        except OSError as exc:
            raise LedgerError("cannot run %s: %s" % (argv[0], exc))
        if check and code != 0:
            command = " ".join(shlex.quote(a) for a in argv[:1] + argv[-1:])
            raise LedgerError("%s failed (exit %d): %s" % (command, code, tail(err or out)))
        return code, out, err

    def makedirs(self, path, mode=0o700):
        self.run(["mkdir", "-m", "%o" % mode, "-p", path])


def _run_streaming(cmd, timeout, on_line, env, kw):
    deadline = time.time() + timeout if timeout else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", env=env, **kw)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            on_line(line.rstrip("\n"))
            if deadline and time.time() > deadline:
                proc.kill()
                raise subprocess.TimeoutExpired(cmd, timeout)
        err = proc.stderr.read()
        code = proc.wait(timeout=max(1, deadline - time.time()) if deadline else None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, "".join(out), err


def tail(text, lines=6):
    return redact("\n".join((text or "").strip().splitlines()[-lines:]))


class PgBackRest(object):
    """The pgbackrest command line for one stanza (and config file), run as the cluster's OS user."""

    _PERCENT = re.compile(r"\((\d+(?:\.\d+)?)%\)")

    def __init__(self, stanza, config=None, os_user="postgres", binary="pgbackrest", block_incremental="auto"):
        if not stanza:
            raise LedgerError("backup_method=pgbackrest needs pgbackrest_stanza (the stanza of the target's cluster)")
        self.stanza = stanza
        self.config = config or None
        self.user = OsUser(os_user)
        self.binary = binary or "pgbackrest"
        self.block_incremental = str(block_incremental or "auto").lower()
        if self.block_incremental not in ("auto", "true", "yes", "on", "1", "false", "no", "off", "0"):
            raise LedgerError("pgbackrest_block_incremental=%r: use auto, true or false" % block_incremental)
        self._version = None

    def version(self):
        """(major, minor) of the pgbackrest binary, e.g. (2, 45)."""
        if self._version is None:
            _code, out, _err = self.user.run([self.binary, "version"], timeout=30)
            match = _VERSION.search(out)
            if not match:
                raise LedgerError("%s version printed %r, not a pgBackRest version" % (self.binary, tail(out, 1)))
            self._version = (int(match.group(1)), int(match.group(2)))
        return self._version

    def block_options(self):
        """The backup's block incremental options for repo1 (where backups go by default), or [].

        auto: on when the binary supports it (>= 2.46); true: required (refused below 2.46);
        false: not on the command line (pgbackrest.conf's repo-block decides).
        """
        mode = self.block_incremental
        if mode in ("false", "no", "off", "0"):
            return []
        supported = self.version() >= BLOCK_INCREMENTAL_SINCE
        if mode in ("true", "yes", "on", "1") and not supported:
            found = BLOCK_INCREMENTAL_SINCE + (self.binary,) + self.version()
            raise LedgerError(
                "pgbackrest_block_incremental=true needs pgBackRest >= %d.%d, %s is %d.%d: install a newer one (the "
                "PGDG package) or set pgbackrest_block_incremental=auto" % found)
        return ["--repo1-bundle", "--repo1-block"] if supported else []

    def base(self):
        argv = [self.binary]
        if self.config:
            # Alone, --config also leaves out the default include path (/etc/pgbackrest/conf.d).
            argv += ["--config=%s" % self.config]
        return argv + ["--stanza=%s" % self.stanza]

    def command_line(self, *args):
        """What an operator types on the database host (shown in refusals)."""
        who = "" if self.user.name == _me() else "sudo -u %s " % self.user.name
        return who + " ".join(shlex.quote(a) for a in self.base() + list(args))

    def run(self, *args, **kw):
        return self.user.run(self.base() + list(args), **kw)

    def info(self, timeout=60):
        _code, out, _err = self.run("info", "--output=json", timeout=timeout)
        try:
            data = json.loads(out)
        except ValueError:
            raise LedgerError("pgbackrest info returned no JSON: %s" % tail(out))
        for stanza in data:
            if stanza.get("name") == self.stanza:
                return stanza
        raise LedgerError("pgbackrest info knows no stanza %s" % self.stanza)

    def check(self, timeout=120):
        code, out, err = self.run("check", timeout=timeout, check=False)
        return code == 0, tail(err or out)

    def backup(self, backup_type, timeout=None, progress=None):
        """Take a backup of `backup_type` (full, diff, incr); progress(percent) per copied file."""
        def on_line(line):
            match = self._PERCENT.search(line)
            if match and progress:
                progress(float(match.group(1)))
        code, out, err = self.run("--type=%s" % backup_type, "--log-level-console=detail", *(self.block_options()
                                  + ["backup"]), timeout=timeout, check=False, on_line=on_line)
        if code != 0:
            raise LedgerError("pgbackrest backup --type=%s of stanza %s failed (exit %d): %s"
                              % (backup_type, self.stanza, code, tail(err or out)))

    def segment_archived(self, archive_id, segment, timeout=60):
        """Whether `segment` is in the repository (repo-ls of its archive directory)."""
        path = "archive/%s/%s/%s/%s" % (self.stanza, archive_id, segment[:16], "")
        code, out, _err = self.run("repo-ls", "--output=text", path, timeout=timeout, check=False)
        return code == 0 and any(name.startswith(segment) for name in out.split())


def _me():
    return pwd.getpwuid(os.geteuid()).pw_name


def newest_backup(info, types=("full", "diff", "incr")):
    """The newest backup of `types` in a stanza's info, or None."""
    found = [b for b in info.get("backup") or [] if b.get("type") in types and not b.get("error")]
    return max(found, key=lambda b: b["timestamp"]["stop"]) if found else None


def archive_id(info):
    """The archive id of the stanza's current database (`15-1`)."""
    archives = info.get("archive") or []
    if not archives:
        raise LedgerError("the stanza %s has no WAL archive yet: run pgbackrest stanza-create and check"
                          % info.get("name"))
    db_id = max(d["id"] for d in info.get("db") or [{"id": archives[-1]["database"]["id"]}])
    for arch in archives:
        if arch["database"]["id"] == db_id:
            return arch["id"]
    return archives[-1]["id"]


def iso(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- server facts

ARCHIVER_SQL = """
SELECT current_setting('archive_mode'), current_setting('archive_command'),
       archived_count, last_archived_wal, last_archived_time,
       failed_count, last_failed_wal, last_failed_time,
       coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false)
  FROM pg_stat_archiver
"""


def archiver_state(cur):
    cur.execute(ARCHIVER_SQL)
    row = cur.fetchone()
    keys = ("archive_mode", "archive_command", "archived_count", "last_archived_wal", "last_archived_time",
            "failed_count", "last_failed_wal", "last_failed_time", "failing")
    state = dict(zip(keys, row))
    for key in ("last_archived_time", "last_failed_time"):
        state[key] = state[key].isoformat() if state[key] else None
    return state


def wait_archived(cur, repo, arch_id, segment, timeout, since_failed_count, poll=0.25):
    """Wait until `segment` is archived: pg_stat_archiver says so and the repository holds it.

    Raises LedgerError when the archiver fails on it (or any later segment) or the time is up.
    """
    deadline = time.time() + timeout
    state = {}
    while True:
        state = archiver_state(cur)
        last = state["last_archived_wal"] or ""
        # A .history or .backup file may be the last one archived: then ask the repository.
        if (segment_le(segment, last) or not _SEGMENT.match(last)) and repo.segment_archived(arch_id, segment):
            return state
        if state["failing"] and (state["failed_count"] or 0) > since_failed_count:
            raise LedgerError(
                "archiving failed on %s (pg_stat_archiver: %d failures, last %s at %s): the restore point's "
                "segment %s is not archived, so it is no safety net"
                % (state["last_failed_wal"], state["failed_count"], state["last_failed_wal"],
                   state["last_failed_time"], segment), archiver=state)
        if time.time() > deadline:
            raise LedgerError(
                "the restore point's WAL segment %s was not archived within %s s (last archived: %s): a restore "
                "point that is not archived is no safety net" % (segment, timeout, state["last_archived_wal"]),
                archiver=state)
        time.sleep(poll)
