# -*- coding: utf-8 -*-
"""Backup helpers shared by the precheck, backup and rollback stages.

A backup here is one `pg_dump` file (custom format) or directory (directory
format) plus a JSON manifest beside it (`<backup>.json`). The manifest is the
source of truth: the rollback stage finds "the newest verified backup of this
target" from manifests only, and checks the file's sha256 against it before
using it.

What lives here:

* naming: `target_slug`, `backup_basename`, `utc_stamp`;
* the PostgreSQL client tools: `find_bindir`, `tool_version`;
* credentials for those tools: `libpq_env` (a temporary 0600 passfile, so the
  password is never on a command line, in a result or in a manifest);
* integrity: `sha256_path`, `full_read_check` (`pg_restore -f /dev/null`, which,
  unlike `pg_restore --list`, fails on truncated and byte-flipped dumps),
  `verify_against_manifest`, `verify_backup`;
* manifests: `write_manifest`, `read_manifest`, `list_manifests`,
  `find_newest_verified`;
* which target a backup is of: `server_identity` (the server's
  `system_identifier` and the database name) and `same_target` (that identity
  when both the manifest and the caller know it, the host:port:db slug otherwise);
* `apply_retention`, `count_rows`, `human_bytes`.

Whether a backup directory is usable (space, mode, creation) is ledger_backup_dir's.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, redact
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target

MANIFEST_SUFFIX = ".json"
FORMAT_SUFFIX = {"custom": ".dump", "directory": ".dir"}
MANIFEST_FORMAT = 1
PG_ROOT = "/usr/lib/postgresql"


# --------------------------------------------------------------------------- naming

def target_slug(url):
    """A file-name-safe name of the database a URL points at: `host-port-dbname`.

    The user is left out on purpose: the same database reached as another role is
    the same target, and its backups belong together.
    """
    t = Target(url)
    slug = "%s-%s-%s" % (t.host, t.port, t.dbname)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", slug).strip("-.").lower()
    return slug or "target"


# --------------------------------------------------------------------------- identity

IDENTITY_SQL = (
    "SELECT CASE WHEN has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')"
    " THEN (SELECT system_identifier::text FROM pg_catalog.pg_control_system()) END, current_database()"
)


def server_identity(cur, dbname=None):
    """{system_identifier, database} of the server a cursor is connected to.

    `system_identifier` is set by initdb and stays with the cluster whatever
    hostname, address or port reaches it (a physical copy made with
    pg_basebackup keeps it too). `dbname` names the database when the cursor is
    connected to another one (the maintenance database of a restore). The
    identifier is a string (it does not fit a JSON number) or None when the role
    may not read it.
    """
    cur.execute(IDENTITY_SQL)
    sysid, current = cur.fetchone()
    return {"system_identifier": sysid, "database": dbname or current}


def same_target(manifest, slug, identity=None):
    """Whether a manifest's backup is of the target (slug of its URL, identity from `server_identity`).

    (system_identifier, database) decide when both the manifest and the caller
    have them, so that a backup taken through another hostname, address or port
    of the same server is recognised. Manifests written before identities were
    recorded fall back to the `host-port-dbname` slug.
    """
    sysid = manifest.get("system_identifier")
    if identity and identity.get("system_identifier") and sysid and manifest.get("database"):
        return (str(sysid) == str(identity["system_identifier"])
                and manifest.get("database") == identity.get("database"))
    return manifest.get("target_slug") == slug


def utc_stamp(when=None):
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return when.strftime("%Y%m%dT%H%M%SZ")


def utc_iso(when=None):
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_tag(run_id):
    """The part of a run id that names its files: `48119d17` of `20261130T201516Z-48119d17`."""
    tag = re.sub(r"[^A-Za-z0-9]", "", str(run_id or "").rsplit("-", 1)[-1])[:16]
    return tag or "adhoc"


def backup_basename(slug, schema_version, stamp, run_id=None):
    """`<target-slug>_<schema-version>_<UTC yyyymmddThhmmssZ>_<run tag>` (no suffix).

    The run's tag keeps two runs started in the same second apart; reserve_backup_path() then
    creates the name exclusively, so that no two runs ever write one file.
    """
    return "%s_%s_%s_%s" % (slug, schema_version or "base", stamp, run_tag(run_id))


def reserve_backup_path(backup_dir, slug, schema_version, stamp, run_id, suffix, directory=False):
    """(final path, partial path) of a new backup, its partial created exclusively (O_EXCL / mkdir).

    The partial file (or, for the directory format, the empty directory pg_dump fills) belongs to
    this call alone: a name already taken, as a backup or as another run's partial, moves on to
    `<stamp>-2`, `-3`, ...
    """
    n = 1
    while True:
        stamp_n = stamp if n == 1 else "%s-%d" % (stamp, n)
        final_path = os.path.join(backup_dir, backup_basename(slug, schema_version, stamp_n, run_id) + suffix)
        # <final>.partial-<run tag>: deterministic per final name, so O_EXCL below is the reservation;
        # the tag also names this run's staged manifest (stage_manifest).
        partial = "%s.partial-%s" % (final_path, run_tag(run_id))
        n += 1
        if os.path.lexists(final_path) or os.path.lexists(manifest_path_for(final_path)):
            continue
        try:
            if directory:
                os.mkdir(partial, 0o700)
            else:
                os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return final_path, partial


def manifest_path_for(backup_path):
    return str(backup_path).rstrip("/") + MANIFEST_SUFFIX


# --------------------------------------------------------------------------- client tools

def find_bindir(server_major=None, configured=None):
    """The directory of pg_dump/pg_restore to use for a server of `server_major`.

    pg_dump must be at least as new as the server: prefer the binaries of the
    server's own major version, then the newest installed, then PATH.
    """
    candidates = []
    if configured:
        candidates.append(configured)
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    if server_major:
        candidates.append(os.path.join(PG_ROOT, str(server_major), "bin"))
    installed = []
    for path in glob.glob(os.path.join(PG_ROOT, "*", "bin")):
        try:
            installed.append((int(path.split(os.sep)[-2]), path))
        except ValueError:
            continue
    candidates.extend(path for _major, path in sorted(installed, reverse=True))
    for cand in candidates:
        if os.path.isfile(os.path.join(cand, "pg_dump")) and os.path.isfile(os.path.join(cand, "pg_restore")):
            return cand
    found = shutil.which("pg_dump")
    if found:
        return os.path.dirname(found)
    raise LedgerError("pg_dump/pg_restore not found (looked in %s and PATH): install the PostgreSQL client "
                      "(apt-get install postgresql-client-%s) or set backup_pg_bindir"
                      % (", ".join(candidates) or PG_ROOT, server_major or 15))


def tool_version(path):
    res = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return (res.stdout or res.stderr).strip()


def tool_major(version_text):
    match = re.search(r"\)\s+(\d+)", version_text or "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- credentials

def _pgpass_escape(value):
    return value.replace("\\", "\\\\").replace(":", "\\:")


class libpq_env(object):  # noqa: N801 - used as a context manager, reads like a function
    """Environment for pg_dump/pg_restore/psql that carries the URL's password in a temp passfile.

        with libpq_env(url) as (env, conninfo):
            subprocess.run([pg_dump, "--dbname", conninfo, ...], env=env)

    The passfile is mode 0600 in a private temp directory and removed on exit;
    `conninfo` is the URL without its password, safe to show in a process list.
    A PGPASSWORD inherited from the environment is dropped so that only the
    target's own credentials are used.
    """

    def __init__(self, url, connect_timeout=10):
        self.url = url
        self.connect_timeout = connect_timeout
        self._dir = None

    def __enter__(self):
        target = Target(self.url)
        env = dict(os.environ)
        env.pop("PGPASSWORD", None)
        env["PGCONNECT_TIMEOUT"] = str(self.connect_timeout)
        env.setdefault("PGAPPNAME", "ledger-migrations")
        if target.password is not None:
            self._dir = tempfile.mkdtemp(prefix="ledger-pgpass-")
            path = os.path.join(self._dir, "pgpass")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write("*:*:*:*:%s\n" % _pgpass_escape(target.password))
            env["PGPASSFILE"] = path
        return env, target.url_without_password()

    def __exit__(self, *exc):
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        return False


def run_tool(argv, env, while_running=None):
    """(exit status, redacted stderr) of a PostgreSQL tool run with env (libpq_env's), from "/".

    while_running() is called once the process has started (the backup counts rows in the dump's
    snapshot meanwhile); if anything goes wrong before the tool ends, the tool is killed.
    """
    errlog = tempfile.TemporaryFile(mode="w+")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errlog, env=env, cwd="/")
        try:
            if while_running is not None:
                while_running()
            rc = proc.wait()
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        errlog.seek(0)
        return rc, redact(errlog.read().strip())
    finally:
        errlog.close()


# --------------------------------------------------------------------------- integrity

def _sha256_file(path, chunk=1024 * 1024):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path):
    """(sha256 hex, size in bytes, per-file sums or None) of a dump file or dump directory.

    A directory-format dump is summed as the sha256 of its sorted listing
    `<sha256>  <name>\\n`, so one value covers every file and its name.
    """
    if os.path.isdir(path):
        files = {}
        size = 0
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                files[name] = _sha256_file(full)
                size += os.path.getsize(full)
        listing = "".join("%s  %s\n" % (files[n], n) for n in sorted(files))
        return hashlib.sha256(listing.encode()).hexdigest(), size, files
    return _sha256_file(path), os.path.getsize(path), None


def path_size(path):
    if os.path.isdir(path):
        total = 0
        for name in os.listdir(path):
            try:
                total += os.path.getsize(os.path.join(path, name))
            except OSError:
                pass
        return total
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def full_read_check(path, bindir=None, timeout=None):
    """Read and decode the whole dump with `pg_restore -f /dev/null`.

    `pg_restore --list` only reads the table of contents: it succeeds on a
    truncated dump and on one with flipped bytes in the data. Writing the whole
    restore script to /dev/null decompresses and parses every entry, and fails
    on both. Returns {"ok", "rc", "error", "seconds"}; never raises on a bad dump.
    """
    bindir = bindir or find_bindir()
    started = datetime.datetime.now()
    try:
        res = subprocess.run([os.path.join(bindir, "pg_restore"), "--exit-on-error", "-f", os.devnull, str(path)],
                             capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "rc": None, "error": "pg_restore -f /dev/null timed out after %ss" % timeout,
                "seconds": timeout}
    seconds = (datetime.datetime.now() - started).total_seconds()
    error = (res.stderr or "").strip()
    return {"ok": res.returncode == 0 and not error.startswith("pg_restore: error"), "rc": res.returncode,
            "error": redact(error)[-2000:] or None, "seconds": round(seconds, 3)}


def verify_against_manifest(backup_path, manifest=None):
    """Compare a backup's sha256 (and size) with its manifest; raise LedgerError on any mismatch."""
    backup_path = str(backup_path).rstrip("/")
    if manifest is None:
        manifest = read_manifest(manifest_path_for(backup_path))
    if not os.path.exists(backup_path):
        raise LedgerError("backup %s is missing (its manifest %s names it)" % (backup_path, manifest_path_for(backup_path)))
    actual, size, files = sha256_path(backup_path)
    expected = manifest.get("sha256")
    if not expected or actual != expected:
        detail = ""
        if files and manifest.get("files"):
            bad = sorted(n for n in set(files) | set(manifest["files"]) if files.get(n) != manifest["files"].get(n))
            detail = " (files differing: %s)" % ", ".join(bad[:10])
        raise LedgerError("backup %s does not match its manifest: sha256 %s, manifest says %s%s; do not restore it, "
                          "use another backup (ls %s)" % (backup_path, actual, expected, detail,
                                                          os.path.dirname(backup_path) or "."),
                          sha256=actual, expected_sha256=expected)
    if manifest.get("size_bytes") is not None and size != manifest["size_bytes"]:
        raise LedgerError("backup %s is %d bytes, its manifest says %d" % (backup_path, size, manifest["size_bytes"]))
    return {"ok": True, "sha256": actual, "size_bytes": size}


def verify_backup(backup_path, manifest=None, bindir=None, timeout=None):
    """The checks a backup must pass before it is restored: sha256 against its manifest, then a full read."""
    result = verify_against_manifest(backup_path, manifest)
    read = full_read_check(backup_path, bindir=bindir, timeout=timeout)
    if not read["ok"]:
        raise LedgerError("backup %s matches its manifest but cannot be read in full (pg_restore -f /dev/null, "
                          "exit %s): %s" % (backup_path, read["rc"], read["error"]), full_read=read)
    result["full_read"] = read
    return result


# --------------------------------------------------------------------------- manifests

def _write_private(path, text):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_manifest(backup_path, manifest):
    path = manifest_path_for(backup_path)
    _write_private(path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path


def stage_manifest(backup_path, manifest, tag):
    """Write the manifest under a name of this run only (created exclusively, fsynced): <manifest>.partial-<tag>.

    It becomes the manifest with publish_backup(), once the dump beside it is complete too.
    """
    path = "%s.partial-%s" % (manifest_path_for(backup_path), tag)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(path)
        raise
    return path


def publish_backup(partial, final_path, staged_manifest):
    """Both complete: the manifest takes its name first, then the dump (the moment the backup exists).

    A manifest whose file is not there yet is no backup (restores need the file present), and a dump
    never has its final name without its manifest. The directory is fsynced after the renames.
    """
    manifest = manifest_path_for(final_path)
    os.replace(staged_manifest, manifest)
    os.replace(partial, final_path)
    fd = os.open(os.path.dirname(final_path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return manifest


def read_manifest(path):
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise LedgerError("cannot read backup manifest %s: %s" % (path, exc))
    if not isinstance(data, dict):
        raise LedgerError("backup manifest %s is not a JSON object" % path)
    return data


def list_manifests(backup_dir, slug=None, identity=None):
    """Every readable manifest in `backup_dir` (of one target when `slug` is given), newest first.

    With `identity` (`server_identity`), a manifest is of the target when
    `same_target` says so. Each is returned with `manifest_path` and
    `backup_path` added. Unreadable or foreign JSON files are skipped.
    """
    out = []
    for path in glob.glob(os.path.join(str(backup_dir), "*" + MANIFEST_SUFFIX)):
        try:
            data = read_manifest(path)
        except LedgerError:
            continue
        if data.get("kind") != "ledger-backup":
            continue
        if slug is not None and not same_target(data, slug, identity):
            continue
        data["manifest_path"] = path
        data["backup_path"] = path[: -len(MANIFEST_SUFFIX)]
        out.append(data)
    out.sort(key=lambda m: (m.get("started_at") or "", m.get("file") or ""), reverse=True)
    return out


def find_newest_verified(backup_dir, slug, identity=None):
    """The newest manifest of the target whose backup passed verification and whose file is present, or None."""
    for manifest in list_manifests(backup_dir, slug, identity):
        if manifest.get("verified") is True and os.path.exists(manifest["backup_path"]):
            return manifest
    return None


def apply_retention(backup_dir, slug, keep, check_mode=False, identity=None):
    """Keep the newest `keep` backups of the target (`same_target`); never delete the newest verified one.

    Returns the list of removed (or, in check mode, to-be-removed) backup paths.
    `keep` of 0 or less keeps everything.
    """
    if not keep or keep <= 0:
        return []
    manifests = list_manifests(backup_dir, slug, identity)
    newest_verified = next((m for m in manifests if m.get("verified") is True
                            and os.path.exists(m["backup_path"])), None)
    removed = []
    for manifest in manifests[keep:]:
        if newest_verified is not None and manifest["manifest_path"] == newest_verified["manifest_path"]:
            continue
        removed.append(manifest["backup_path"])
        if check_mode:
            continue
        path = manifest["backup_path"]
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
        os.unlink(manifest["manifest_path"])
    return removed


def human_bytes(num):
    if num is None:
        return "?"
    num = float(num)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return ("%d %s" % (num, unit)) if unit == "B" else ("%.1f %s" % (num, unit))
        num /= 1024.0
    return "%.1f TiB" % num  # pragma: no cover


# --------------------------------------------------------------------------- rows

COUNTABLE_TABLES_SQL = """
SELECT n.nspname, c.relname
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY 1, 2
"""


def count_rows(cur, exclude=None):
    """Exact row counts of every user table (leaf tables; partitions are counted one by one).

    Run it inside the transaction whose snapshot pg_dump uses (or in the restored
    copy) so that both sides count the same data.
    """
    from psycopg2 import sql as _sql

    cur.execute(COUNTABLE_TABLES_SQL)
    counts = {}
    for schema, table in cur.fetchall():
        name = "%s.%s" % (schema, table)
        if exclude and name in exclude:
            continue
        cur.execute(_sql.SQL("SELECT count(*) FROM {}.{}").format(_sql.Identifier(schema), _sql.Identifier(table)))
        counts[name] = cur.fetchone()[0]
    return counts
