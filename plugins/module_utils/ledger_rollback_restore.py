# -*- coding: utf-8 -*-
"""ledger_rollback's restore: a verified backup restored into a new database, checked, then swapped in by rename."""

from __future__ import annotations

import os
import re
import subprocess
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, ensure_records, format_pg_error, log_event, pg_error,
    redact, redact_obj, url_with_database,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_leftovers import (
    drop_command, drop_database, drop_how as _drop_how, leftover_databases, restore_names,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import Lifeline, child_preexec
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import Lease
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    find_bindir, find_newest_verified, full_read_check, human_bytes, libpq_env, list_manifests,
    manifest_path_for, read_manifest, same_target, server_identity, target_slug, verify_against_manifest,
)

try:
    import psycopg2
    from psycopg2 import sql
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
    sql = None

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rollback_plan import (
    _applied,
    _cmd,
    _defaults,
)


def _sessions(cur, dbname):
    cur.execute(
        "SELECT pid, usename, application_name, coalesce(host(client_addr), 'local'), state, backend_type,"
        "       extract(epoch FROM now() - backend_start)::int, left(regexp_replace(query, '\\s+', ' ', 'g'), 80)"
        "  FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY backend_start", (dbname,))
    return [{"pid": r[0], "user": r[1], "application_name": r[2], "client": r[3], "state": r[4],
             "backend_type": r[5], "connected_s": r[6], "query": r[7]} for r in cur.fetchall()]


def _describe_sessions(rows, limit=8):
    out = ["pid %s (%s, %s, from %s, %s, %ss)" % (r["pid"], r["user"], r["application_name"] or r["backend_type"],
                                                  r["client"], r["state"] or r["backend_type"], r["connected_s"])
           for r in rows[:limit]]
    if len(rows) > limit:
        out.append("and %d more" % (len(rows) - limit))
    return "; ".join(out)


def _db_properties(cur, dbname):
    cur.execute(
        "SELECT d.oid, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,"
        "       d.datlocprovider, d.daticulocale, d.datconnlimit, t.spcname, d.datacl IS NOT NULL,"
        "       shobj_description(d.oid, 'pg_database'), pg_database_size(d.oid)"
        "  FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s", (dbname,))
    row = cur.fetchone()
    if row is None:
        return None
    props = dict(zip(("oid", "owner", "encoding", "collate", "ctype", "locprovider", "icu_locale", "connlimit",
                      "tablespace", "has_acl", "comment", "size"), row))
    props["acl"] = []
    if props["has_acl"]:
        cur.execute("SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,"
                    "       a.privilege_type, a.is_grantable"
                    "  FROM pg_database d, aclexplode(d.datacl) a WHERE d.oid = %s", (props["oid"],))
        props["acl"] = [{"grantee": g, "privilege": priv, "grantable": gr} for g, priv, gr in cur.fetchall()]
    cur.execute("SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, unnest(s.setconfig)"
                "  FROM pg_db_role_setting s WHERE s.setdatabase = %s", (props["oid"],))
    props["settings"] = [{"role": r, "setting": s} for r, s in cur.fetchall()]
    return props


# GUCs whose stored value is a list of already-quoted items (pg_dump treats them the same way).
_LIST_GUCS = ("search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries",
              "shared_preload_libraries")


def _create_like(cur, new_db, props):
    """CREATE DATABASE new_db with the properties, grants and settings of the database it will replace."""
    opts = [sql.SQL("TEMPLATE template0"), sql.SQL("OWNER {}").format(sql.Identifier(props["owner"])),
            sql.SQL("ENCODING {}").format(sql.Literal(props["encoding"])),
            sql.SQL("LC_COLLATE {}").format(sql.Literal(props["collate"])),
            sql.SQL("LC_CTYPE {}").format(sql.Literal(props["ctype"])),
            sql.SQL("TABLESPACE {}").format(sql.Identifier(props["tablespace"])),
            sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(props["connlimit"]))]
    if props.get("locprovider") == "i":
        opts += [sql.SQL("LOCALE_PROVIDER icu"), sql.SQL("ICU_LOCALE {}").format(sql.Literal(props["icu_locale"]))]
    cur.execute(sql.SQL("CREATE DATABASE {} ").format(sql.Identifier(new_db)) + sql.SQL(" ").join(opts))
    ident = sql.Identifier(new_db)
    if props["has_acl"]:
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(ident, sql.Identifier(props["owner"])))
        for a in props["acl"]:
            grantee = sql.SQL("PUBLIC") if a["grantee"] is None else sql.Identifier(a["grantee"])
            cur.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(a["privilege"]), ident, grantee,
                sql.SQL(" WITH GRANT OPTION" if a["grantable"] else "")))
    for s in props["settings"]:
        name, _unused, value = s["setting"].partition("=")
        val = sql.SQL(value) if name.lower() in _LIST_GUCS else sql.Literal(value)
        if s["role"] is None:
            cur.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(ident, sql.Identifier(name), val))
        else:
            cur.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} TO {}").format(
                sql.Identifier(s["role"]), ident, sql.Identifier(name), val))
    if props.get("comment"):
        cur.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(props["comment"])))


def _archive_tables(bindir, path):
    """Tables (schema.name) with data in the archive's table of contents."""
    res = subprocess.run([os.path.join(bindir, "pg_restore"), "--list", path], capture_output=True, text=True,
                         check=False)
    tables = set()
    for line in res.stdout.splitlines():
        if line.startswith(";"):
            continue
        m = re.match(r"^\s*\d+;\s*\d+\s+\d+\s+TABLE\s+(?!DATA\s)(\S+)\s+(\S+)\s", line)
        if m:
            tables.add("%s.%s" % (m.group(1), m.group(2)))
    return tables


def _locate_backup(p, url, host, identity=None):
    """(backup path, manifest) to restore, or raise before anything is touched.

    A backup is of this target when its manifest's (system_identifier, database) equal the target's (or, for a
    manifest without them, when its host-port-dbname slug equals the URL's).
    """
    slug = target_slug(url)
    target = describe_target(url)
    if p.get("backup_file"):
        path = os.path.abspath(os.path.expanduser(str(p["backup_file"]))).rstrip("/")
        mpath = manifest_path_for(path)
        if not os.path.exists(mpath):
            raise LedgerError("backup_file %s has no manifest beside it (%s): its checksum can't be checked, so it is "
                              "not restored. Nothing was changed" % (path, mpath))
        manifest = read_manifest(mpath)
        if manifest.get("verified") is not True:
            raise LedgerError("backup %s failed its verification when it was taken (its manifest %s says "
                              "verified=%s): it is not restored. Nothing was changed; choose another backup"
                              % (path, mpath, manifest.get("verified")))
        other = not same_target(manifest, slug, identity)
        if other and not p.get("backup_other_target"):
            how = ("server %s, database %s; this target is server %s, database %s" % (
                manifest.get("system_identifier"), manifest.get("database"),
                (identity or {}).get("system_identifier"), (identity or {}).get("database"))
                if manifest.get("system_identifier") and (identity or {}).get("system_identifier")
                else "its manifest names %s" % manifest.get("target_slug"))
            raise LedgerError("backup %s is of %s, not of %s (%s): it is not restored over another database. Nothing "
                              "was changed. If that is what you mean (e.g. a copy of production into a scratch "
                              "database), say so: %s" % (
                                  path, manifest.get("target"), target, how,
                                  _cmd(host, "-e rollback_mode=restore", "-e backup_file=%s" % path,
                                       "-e rollback_backup_other_target=true")),
                              backup_file=path, refused="other_target")
        manifest = dict(manifest, backup_path=path, manifest_path=mpath, other_target=other)
        return path, manifest
    backup_dir = p.get("backup_dir")
    if not backup_dir:
        raise LedgerError("no backup_dir to look for backups of %s in: set backup_dir, or give -e backup_file=PATH"
                          % target)
    manifest = find_newest_verified(backup_dir, slug, identity)
    if manifest is None:
        others = list_manifests(backup_dir, slug, identity)
        raise LedgerError("no verified backup of %s in %s (%d manifest(s) of this target, none verified with its file "
                          "present). Nothing was changed; give one with %s"
                          % (target, backup_dir, len(others), _cmd(host, "-e rollback_mode=restore",
                                                                   "-e backup_file=PATH")))
    return manifest["backup_path"], dict(manifest, other_target=False)


def _db_exists(cur, name):
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    return cur.fetchone() is not None


def _connect_through_swap(url, connect_timeout):
    """connect(), retried twice: a connection that arrives during another restore's swap waits on the
    database's lock, then is refused once ("database ... does not exist. It seems to have just been dropped
    or renamed"); the name is back (the restored copy) a moment later."""
    for attempt in range(3):
        try:
            return connect(url, autocommit=True, connect_timeout=connect_timeout)
        except LedgerError:
            if attempt == 2:
                raise
            time.sleep(0.3)


class RestoreLease(Lease):
    """The per-target run lease of migrate and revert (migrations.lock), taken by a restore.

    Unlike migrate's, it holds no connection to the target between its polls and beats: a
    session connected to the target would block the swap (ALTER DATABASE ... RENAME refuses while
    anyone is connected). Before the swap park() stops the heartbeat and pushes the expiry out by
    ``hold`` seconds, so nobody takes the lease while the names change; after the swap the row is
    in the kept database (and deleted there), and the restored database's lease was cleared with
    the copy's check: the target is free again.
    """

    def __init__(self, url, run_id, ttl, wait, connect_timeout, advice=None):
        super(RestoreLease, self).__init__(url, None, run_id, ttl=ttl if ttl is not None else 60.0, wait=wait,
                                           advice=advice)
        self.holder = "restore by " + self.holder
        self.connect_timeout = connect_timeout

    def _fresh(self):
        self.conn = _connect_through_swap(self.url, self.connect_timeout)
        return self.conn

    def _try(self):
        self._fresh()
        try:
            return super(RestoreLease, self)._try()
        finally:
            self.conn.close()

    def _event(self, outcome, duration_ms=None, detail=None):
        try:
            self._fresh()
        except LedgerError:
            return
        try:
            super(RestoreLease, self)._event(outcome, duration_ms, detail)
        finally:
            self.conn.close()

    def _beat(self):
        """Renew every ttl/3 seconds, each time on a connection of its own, closed at once."""
        interval = max(0.3, self.ttl / 3.0)
        while not self._stop.wait(interval):
            try:
                conn = connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
            except LedgerError:
                continue  # a missed beat is retried; the lease outlives two of them
            try:
                with conn.cursor() as cur:
                    cur.execute("UPDATE migrations.lock SET renewed_at = clock_timestamp(),"
                                " expires_at = clock_timestamp() + %s * interval '1 second'"
                                " WHERE id = 1 AND run_id = %s AND holder = %s RETURNING 1",
                                (self.ttl, self.run_id, self.holder))
                    if cur.fetchone() is None:
                        self.lost = "someone else"
            except psycopg2.Error:
                pass
            finally:
                conn.close()

    def park(self, hold):
        """Stop the heartbeat and extend the lease by ``hold`` seconds; no connection to the target stays open."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        conn = self._fresh()
        try:
            with conn.cursor() as cur:
                cur.execute("UPDATE migrations.lock SET renewed_at = clock_timestamp(),"
                            " expires_at = clock_timestamp() + %s * interval '1 second'"
                            " WHERE id = 1 AND run_id = %s AND holder = %s", (self.ttl + hold, self.run_id, self.holder))
        finally:
            conn.close()

    def release_in(self, url):
        """Delete this lease's row from the database at ``url`` (the kept database after the swap)."""
        self._stop.set()
        self.held = False
        try:
            conn = connect(url, autocommit=True, connect_timeout=self.connect_timeout)
        except LedgerError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("DELETE FROM migrations.lock WHERE id = 1 AND run_id = %s AND holder = %s",
                            (self.run_id, self.holder))
            return True
        except psycopg2.Error:
            return False
        finally:
            conn.close()


def _drop_scratch(cur, admin_url, name, how, p, what="The partial copy"):
    """Drop this run's scratch copy; the sentence saying what happened, known before it is said.

    The admin connection may be gone with the server (stopped mid-restore): one fresh connection is
    tried; a copy that still can't be dropped is named with the command that drops it.
    """
    ok, error = drop_database(cur, name) if cur is not None and not cur.connection.closed else (False, None)
    if not ok:
        try:
            conn = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
        except LedgerError as exc:
            error = error or exc.msg
        else:
            try:
                with conn.cursor() as cur2:
                    ok, error = drop_database(cur2, name)
            finally:
                conn.close()
    if ok:
        return "%s %s was dropped" % (what, name), True
    return ("%s %s could NOT be dropped (%s): it is still on the server; drop it with: %s, or with the rollback "
            "playbook and -e rollback_drop_leftovers=true"
            % (what, name, redact(error or "no connection"), drop_command(how, name))), False


def _log_if_recorded(url, p, outcome, version, duration_ms, detail):
    """Log an event on its own connection when the records exist; a failed restore creates nothing."""
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    except LedgerError:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('migrations.events') IS NOT NULL")
            if not cur.fetchone()[0]:
                return False
            log_event(cur, p.get("run_id") or "adhoc", "restore", outcome, version=version,
                      duration_ms=duration_ms, detail=detail)
            return True
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def _restore_failed(url, p, started, msg, fields):
    """Record the failed restore on the (unchanged) target, then raise the operator's error."""
    fields = dict(fields, event_logged=_log_if_recorded(
        url, p, "failed", fields.get("schema_version"), int((time.time() - started) * 1000),
        dict(redact_obj(dict((k, v) for k, v in fields.items() if k != "blocking_sessions")), error=redact(msg))))
    raise LedgerError(msg, **fields)


# Backends a restore deals with: client sessions (terminated only with terminate_connections; a parallel worker
# goes with its leader) and autovacuum workers (terminated at the swap: they restart on their own). Any other
# process connected to the database (a walsender of logical replication, a background worker) refuses the restore.
CLIENT_BACKENDS = ("client backend", "parallel worker")
SELF_RESTARTING = ("autovacuum worker",)
# Hosts whose server's data directory can be this machine's (free space measurable with statvfs).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _restore_space(cur, url, props, margin):
    """Room for the copy: {needed_bytes, margin, free_bytes (None when not measurable), path, why}.

    Measured only when the server runs on this machine (the URL's host is a loopback name or a socket
    directory) and the role may read data_directory (superuser or pg_read_all_settings): then the free space of
    the filesystem holding the database's tablespace (statvfs). Otherwise the size needed is only reported.
    """
    needed = int(props["size"] * margin)
    out = {"needed_bytes": needed, "margin": margin, "free_bytes": None, "path": None, "why": None}
    host = Target(url).host or ""
    if host not in LOCAL_HOSTS and not host.startswith("/"):
        out["why"] = "the server (%s) is not on this machine" % host
        return out
    cur.execute("SELECT CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE')"
                " THEN current_setting('data_directory') END,"
                " (SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = %s)",
                (props["tablespace"],))
    datadir, location = cur.fetchone()
    if not datadir:
        out["why"] = "the role may not read data_directory (superuser or pg_read_all_settings needed)"
        return out
    path = location or datadir
    out["path"] = path
    if not os.path.isdir(path):
        out["why"] = "%s is not a directory on this machine" % path
        return out
    try:
        st = os.statvfs(path)
    except OSError as exc:
        out["why"] = "cannot read the free space of %s: %s" % (path, exc)
        return out
    out["free_bytes"] = st.f_bavail * st.f_frsize
    return out


def _copies_advice(copies, how):
    if not copies:
        return "Free space on the server (or restore on another one), then re-run"
    total = sum(c["size_bytes"] or 0 for c in copies)
    names = ", ".join("%s (%s)" % (c["name"], human_bytes(c["size_bytes"])) for c in copies[:5])
    if len(copies) > 5:
        names += " and %d more" % (len(copies) - 5)
    return ("%d database(s) kept by earlier restores hold %s: %s. Drop those no longer needed (after checking "
            "that nothing written to them is still wanted), e.g.: %s" % (
                len(copies), human_bytes(total), names, drop_command(how, copies[0]["name"])))


def _describe_space(space, props):
    text = "the copy needs about %s free on the server (%s database x %s)" % (
        human_bytes(space["needed_bytes"]), human_bytes(props["size"]), space["margin"])
    if space["free_bytes"] is not None:
        text += ", %s has %s free" % (space["path"], human_bytes(space["free_bytes"]))
    else:
        text += "; free space not measured: %s" % space["why"]
    if space.get("previous_copies"):
        text += "; %d database(s) kept by earlier restores hold %s" % (
            len(space["previous_copies"]), human_bytes(sum(c["size_bytes"] or 0 for c in space["previous_copies"])))
    return text


def _take_lease(p):
    """The target's run lease (the one migrate and revert take), or a refusal naming its holder."""
    url = p["database_url"]
    conn = _connect_through_swap(url, p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            # The lease lives in migrations.lock: a target never migrated gets its (empty) records here.
            ensure_records(cur)
    except psycopg2.Error as exc:
        raise LedgerError("cannot prepare the run lease on %s: %s. Nothing was changed"
                          % (describe_target(url), format_pg_error(pg_error(exc))), sqlstate=exc.pgcode)
    finally:
        conn.close()
    lease = RestoreLease(url, p.get("run_id") or "adhoc", p.get("lock_ttl"), p.get("lock_wait"),
                         p["connect_timeout"], advice=_RestoreAdvice(p.get("host_label")))
    return lease.acquire()


class _RestoreAdvice(object):
    def __init__(self, host):
        self.host = host

    def migrate(self):
        return _cmd(self.host, "-e rollback_mode=restore")


def run_restore(params, check_mode=False):
    """Restore a verified backup; every failure of a real run is logged as a restore:failed event."""
    p = _defaults(params)
    started = time.time()
    dbname = Target(p["database_url"]).dbname
    if dbname == p["maintenance_db"]:
        raise LedgerError("the target database %s is also the maintenance database the restore connects to for the "
                          "swap: set rollback_maintenance_db to another one (e.g. template1). Nothing was changed"
                          % dbname)
    if check_mode:
        return _restore(p, True, started, None, None)
    # The work dies with the playbook (Ansible's worker is in its own session: see ledger_lifeline).
    lifeline = Lifeline().die_with_parent()
    lease = None
    try:
        lease = _take_lease(p)
        return _restore(p, False, started, lease, lifeline)
    except LedgerError as exc:
        if "event_logged" not in exc.fields:
            fields = exc.fields
            exc.fields["event_logged"] = _log_if_recorded(
                p["database_url"], p, "failed", fields.get("schema_version"), int((time.time() - started) * 1000),
                dict(redact_obj(dict((k, v) for k, v in fields.items() if k != "blocking_sessions")),
                     error=redact(exc.msg)))
        raise
    finally:
        if lease is not None and lease.held:
            lease.release()


def _restore(p, check_mode, started, lease, lifeline):
    url = p["database_url"]
    target = describe_target(url)
    host = p.get("host_label")
    dbname = Target(url).dbname
    admin_url = url_with_database(url, p["maintenance_db"])
    admin = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with admin.cursor() as cur:
            # Which server this is, whatever name or port reached it: the backups of this target are those
            # whose manifests name the same system_identifier and database.
            identity = server_identity(cur, dbname)
            path, manifest = _locate_backup(p, url, host, identity)
            # 1. The file is the one the manifest describes (sha256, size) and reads in full: before anything else.
            verify_against_manifest(path, manifest)
            cur.execute("SELECT current_setting('server_version_num')::int / 10000, rolsuper OR rolcreatedb"
                        "  FROM pg_roles WHERE rolname = current_user")
            major, can_create = cur.fetchone()
            bindir = find_bindir(major, p.get("pg_bindir"))
            read = full_read_check(path, bindir=bindir)
            if not read["ok"]:
                raise LedgerError("backup %s matches its manifest but can't be read in full (pg_restore -f /dev/null "
                                  "exited %s): %s. Nothing was changed; choose another backup (-e backup_file=PATH)"
                                  % (path, read["rc"], read["error"]), full_read=read, backup_file=path)
            props = _db_properties(cur, dbname)
            if props is None:
                raise LedgerError("database %s does not exist on %s: nothing to restore over (create it, or restore "
                                  "by hand with pg_restore --create)" % (dbname, describe_target(admin_url)))
            if not can_create:
                raise LedgerError("the role connecting to %s can't CREATE DATABASE: the restore goes into a new "
                                  "database swapped in by name; grant CREATEDB (or run it as the database owner with "
                                  "CREATEDB). Nothing was changed" % target)
            sessions = _sessions(cur, dbname)
            space = _restore_space(cur, url, props, float(p.get("restore_space_margin") or 1.2))
            leftovers = leftover_databases(cur, dbname)
            space["previous_copies"] = [{"name": d["name"], "size_bytes": d["size_bytes"]}
                                        for d in leftovers if d["kind"] == "kept"]
            # Unique per run (a stamp and a random tag): two restores never share a scratch copy.
            new_db, old_db = restore_names(dbname)
            while _db_exists(cur, new_db) or _db_exists(cur, old_db):
                new_db, old_db = restore_names(dbname)
    finally:
        admin.close()
    clients = [s for s in sessions if s["backend_type"] in CLIENT_BACKENDS]
    others = [s for s in sessions if s["backend_type"] not in CLIENT_BACKENDS + SELF_RESTARTING]
    drop_how = _drop_how(admin_url)
    base = {"target": target, "backup_file": path, "manifest": manifest.get("manifest_path"),
            "sha256": manifest.get("sha256"), "backup_taken_at": manifest.get("started_at"),
            "schema_version": manifest.get("schema_version"), "backup_applied": manifest.get("applied"),
            "restored_database": dbname, "staging_database": new_db, "previous_database": old_db,
            "blocking_sessions": sessions, "database_size_bytes": props["size"], "check_mode": check_mode,
            "space": space, "other_target": bool(manifest.get("other_target")),
            "backup_system_identifier": manifest.get("system_identifier"), "backup_database": manifest.get("database"),
            "strategy": "restore into a new database, check it, swap the names"}
    if others:
        raise LedgerError(
            "refusing to restore %s: %d server process(es) that are not client sessions are connected to %s: %s. "
            "The restore terminates client sessions (with rollback_terminate_connections) and autovacuum workers "
            "only, never a replication sender or a background worker: stop them first (a logical replication "
            "subscriber: ALTER SUBSCRIPTION ... DISABLE on the subscriber; a background worker: its extension's "
            "own command), then re-run. Nothing was changed" % (target, len(others), dbname,
                                                                _describe_sessions(others)),
            **dict(base, refused="server_processes", server_processes=others))
    if space["free_bytes"] is not None and space["free_bytes"] < space["needed_bytes"]:
        raise LedgerError(
            "refusing to restore %s: the copy needs about %s free (%s database x %s) where the server keeps it (%s), "
            "which has %s free. Nothing was changed. %s" % (
                target, human_bytes(space["needed_bytes"]), human_bytes(props["size"]), space["margin"],
                space["path"], human_bytes(space["free_bytes"]), _copies_advice(space["previous_copies"], drop_how)),
            **dict(base, refused="space"))
    if clients and not p.get("terminate_connections"):
        raise LedgerError(
            "refusing to restore %s: %d session(s) are connected to %s and the restored database can only be swapped "
            "in when they are gone: %s. Nothing was changed. Stop them (the application, PgBouncer: PAUSE), or let the "
            "restore terminate them: %s" % (target, len(clients), dbname, _describe_sessions(clients),
                                            _cmd(host, "-e rollback_mode=restore",
                                                 "-e rollback_terminate_connections=true")),
            **dict(base, refused="sessions"))
    if check_mode:
        return dict(base, changed=True, msg=(
            "would restore %s (sha256 %s verified against its manifest, read in full; taken %s at version %s) into a "
            "new database %s, check it, then swap it in for %s and keep the current one as %s; %s%s%s" % (
                path, (manifest.get("sha256") or "")[:12], manifest.get("started_at"),
                manifest.get("schema_version") or "base", new_db, dbname, old_db, _describe_space(space, props),
                "; would terminate %d session(s): %s" % (len(clients), _describe_sessions(clients)) if clients else
                "", "; the backup is of another target (%s), restored as asked" % manifest.get("target")
                if manifest.get("other_target") else "")))

    admin = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
    swapped = False
    cur = None
    try:
        cur = admin.cursor()
        # 2. The copy: a new database like the current one, restored with --exit-on-error.
        try:
            _create_like(cur, new_db, props)
        except psycopg2.Error as exc:
            err = pg_error(exc)
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, drop_how, p, "The new database")
            _restore_failed(url, p, started, "cannot create the database %s to restore %s into: %s. %s. %s is "
                            "unchanged" % (new_db, path, format_pg_error(err), cleanup, target),
                            dict(base, sqlstate=err["sqlstate"], scratch_dropped=dropped))
        cmd = [os.path.join(bindir, "pg_restore"), "--exit-on-error", "--no-password"]
        if int(p.get("restore_jobs") or 1) > 1:
            cmd += ["--jobs=%d" % int(p["restore_jobs"])]
        with libpq_env(url, p["connect_timeout"]) as (env, conninfo):
            # pg_restore dies with this process (a killed worker must not leave it loading).
            res = subprocess.run(cmd + ["--dbname=%s" % url_with_database(conninfo, new_db), path],
                                 capture_output=True, text=True, env=env, check=False, cwd="/",
                                 preexec_fn=child_preexec)
        if res.returncode != 0:
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, drop_how, p)
            _restore_failed(url, p, started, (
                "restore of %s failed half-way (pg_restore exited %d): %s. %s; %s is "
                "unchanged. Choose another backup (-e backup_file=PATH) or revert with the down scripts: %s"
                % (path, res.returncode, redact(res.stderr.strip())[-1500:] or "no message", cleanup, target,
                   _cmd(host, "-e rollback_to=<version>"))),
                dict(base, pg_restore_rc=res.returncode, scratch_dropped=dropped))
        # 3. Check the copy before it replaces anything.
        try:
            problems, counts = _check_copy(url_with_database(url, new_db), manifest, bindir, path, p)
        except (LedgerError, psycopg2.Error) as exc:
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, drop_how, p)
            _restore_failed(url, p, started, "the restored copy %s could not be checked: %s. %s; %s is unchanged" % (
                new_db, redact(getattr(exc, "msg", None) or str(exc)).strip(), cleanup, target),
                dict(base, scratch_dropped=dropped))
        if problems:
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, drop_how, p, "It")
            _restore_failed(url, p, started, (
                "the restored copy of %s does not match its manifest: %s. %s; %s is unchanged"
                % (path, "; ".join(problems), cleanup, target)), dict(base, problems=problems, scratch_dropped=dropped))
        # 4. The swap: the point of no return. Only while the playbook that started it is alive.
        if not lifeline.parent_alive():
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, drop_how, p, "The restored copy")
            _restore_failed(url, p, started, (
                "the playbook that started this restore of %s is gone (its process exited): the swap was not done. "
                "%s; %s is unchanged" % (target, cleanup, target)), dict(base, scratch_dropped=dropped,
                                                                         refused="parent_gone"))
        lease.park(max(int(p.get("swap_timeout") or 15), 1) + 30)
        terminated = _swap(cur, dbname, new_db, old_db, p, base, url, started, admin_url, drop_how)
        swapped = True
    except BaseException:
        # Anything unforeseen (an internal error, an interrupt) still drops this run's own copy.
        if not swapped and cur is not None and not admin.closed:
            _drop_scratch(cur, admin_url, new_db, drop_how, p)
        raise
    finally:
        admin.close()
    # The lease row went with the kept database: delete it there (the restored one's was cleared).
    lease.release_in(url_with_database(url, old_db))
    duration_ms = int((time.time() - started) * 1000)
    detail = {"backup_file": path, "sha256": manifest.get("sha256"), "backup_taken_at": manifest.get("started_at"),
              "backup_run_id": manifest.get("run_id"), "applied": manifest.get("applied"),
              "previous_database": old_db, "terminated": [s["pid"] for s in terminated], "tables": len(counts)}
    # 5. The record, in the restored database (its events log came back with the dump). The restore
    # is done whatever happens here: a failure to log is reported, not raised.
    logged, log_error = True, None
    try:
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
        try:
            with conn.cursor() as cur:
                ensure_records(cur)
                log_event(cur, p.get("run_id") or "adhoc", "restore", "ok", version=manifest.get("schema_version"),
                          duration_ms=duration_ms, detail=detail)
        finally:
            conn.close()
    except (LedgerError, psycopg2.Error) as exc:
        logged, log_error = False, redact(getattr(exc, "msg", None) or str(exc)).strip()
    drop_cmd = drop_command(drop_how, old_db)
    warnings = [] if logged else ["the restore could not be logged in migrations.events: %s" % log_error]
    if space["previous_copies"]:
        warnings.append("%d earlier copies kept by restores are still on the server: %s" % (
            len(space["previous_copies"]), _copies_advice(space["previous_copies"], drop_how)))
    return dict(base, changed=swapped, terminated=terminated, event_logged=logged, row_counts=counts,
                warnings=warnings,
                duration_s=round(duration_ms / 1000.0, 3), drop_previous=drop_cmd,
                msg="restored %s into %s (version %s, taken %s; sha256 verified); the database as it was is kept as "
                    "%s (drop it when no longer needed: %s)%s" % (
                        path, target, manifest.get("schema_version") or "base", manifest.get("started_at"), old_db,
                        drop_cmd, "; terminated %d session(s)" % len(terminated) if terminated else ""))


def _check_copy(copy_url, manifest, bindir, path, p):
    """Problems of the restored copy against its manifest (empty when it is right), and its row counts."""
    problems = []
    counts = {}
    conn = connect(copy_url, autocommit=True, connect_timeout=p["connect_timeout"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')")
            present = set(r[0] for r in cur.fetchall())
            missing = sorted(_archive_tables(bindir, path) - present)
            if missing:
                problems.append("tables of the archive missing from the copy: %s" % ", ".join(missing[:10]))
            applied = [a["version"] for a in _applied(cur)]
            if manifest.get("applied") is not None and applied != list(manifest["applied"]):
                problems.append("migrations.history of the copy is %s, the manifest says %s" % (
                    ", ".join(applied) or "empty", ", ".join(manifest["applied"]) or "empty"))
            if manifest.get("row_counts"):
                for table, rows in sorted(manifest["row_counts"].items()):
                    schema, _unused, name = table.partition(".")
                    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, name).as_string(cur),))
                    if not cur.fetchone()[0]:
                        problems.append("%s missing (the manifest counts %s rows)" % (table, rows))
                        continue
                    cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))
                    counts[table] = cur.fetchone()[0]
                    if counts[table] != rows:
                        problems.append("%s has %d rows, the manifest %d" % (table, counts[table], rows))
            # The run lease in a dump is a snapshot of a run long gone: the restored database starts free.
            cur.execute("SELECT to_regclass('migrations.lock') IS NOT NULL")
            if cur.fetchone()[0]:
                cur.execute("DELETE FROM migrations.lock")
    finally:
        conn.close()
    return problems, counts


def _swap(cur, dbname, new_db, old_db, p, base, url, started, admin_url, how):
    """Rename the current database away and the copy into its place, in one transaction.

    ALTER DATABASE ... RENAME refuses while anyone is connected to the database (55006). The sessions
    are terminated inside the transaction that renames: RENAME first takes the database's lock (a new
    connection waits on it, then finds the name gone or taken by the restored copy) and then waits up to 5 s
    for the terminated sessions to exit. Nothing is changed outside that transaction (no ALLOW_CONNECTIONS
    false, which a kill would leave behind): a kill at any instant leaves either the original or the
    restored database under the name, and both accept connections. Autovacuum workers are always terminated
    (they restart on their own); any other server process (a walsender, a background worker) fails the swap,
    naming it: it is never terminated. Retried on 55006 until swap_timeout.
    """
    terminated = {}
    deadline = time.time() + max(int(p.get("swap_timeout") or 15), 1)
    while True:
        sessions = _sessions(cur, dbname)
        others = [s for s in sessions if s["backend_type"] not in CLIENT_BACKENDS + SELF_RESTARTING]
        if others:
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, how, p, "The restored copy")
            _restore_failed(url, p, started, (
                "the restored copy could not be swapped in for %s: server process(es) that are not client "
                "sessions connected to it: %s. They are never terminated by the restore. %s; "
                "%s is unchanged. Stop them, then re-run"
                % (dbname, _describe_sessions(others), cleanup, describe_target(url))),
                dict(base, refused="server_processes", server_processes=others, scratch_dropped=dropped))
        try:
            cur.execute("BEGIN")
            for s in sessions:
                # Autovacuum workers don't belong to anyone; they restart on their own. A parallel worker
                # goes with its leader.
                if s["backend_type"] in SELF_RESTARTING or (
                        s["backend_type"] == "client backend" and p.get("terminate_connections")):
                    cur.execute("SELECT pg_terminate_backend(%s)", (s["pid"],))
                    if s["backend_type"] == "client backend":
                        terminated.setdefault(s["pid"], s)
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname),
                                                                         sql.Identifier(old_db)))
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(new_db),
                                                                         sql.Identifier(dbname)))
            cur.execute("COMMIT")
            return list(terminated.values())
        except psycopg2.Error as exc:
            try:
                cur.execute("ROLLBACK")
            except psycopg2.Error:
                pass
            err = pg_error(exc)
            if err["sqlstate"] != "55006" or time.time() > deadline:
                left = _sessions(cur, dbname) if not cur.connection.closed else []
                cleanup, dropped = _drop_scratch(cur, admin_url, new_db, how, p, "The restored copy")
                _restore_failed(url, p, started, (
                    "the restored copy could not be swapped in for %s: %s%s. %s; %s is "
                    "unchanged. %s" % (
                        dbname, format_pg_error(err), " (still connected: %s)" % _describe_sessions(left)
                        if left else "", cleanup, describe_target(url),
                        "Re-run with the sessions stopped, or: %s" % _cmd(
                            p.get("host_label"), "-e rollback_mode=restore",
                            "-e rollback_terminate_connections=true")
                        if not p.get("terminate_connections") else "Re-run when they are gone")),
                    dict(base, sqlstate=err["sqlstate"], blocking_sessions=left, scratch_dropped=dropped))
            time.sleep(0.1)


# =========================================================================== entry point
