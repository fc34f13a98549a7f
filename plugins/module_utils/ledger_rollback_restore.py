# -*- coding: utf-8 -*-
"""ledger_rollback's restore: a verified backup restored into a new database, checked, then swapped in by rename."""

from __future__ import annotations

import os
import random
import re
import shlex
import subprocess
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, ensure_records, format_pg_error, log_event, pg_error,
    redact, redact_obj, url_with_database,
)
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


def _short_name(dbname, suffix):
    """`<db><suffix>` within PostgreSQL's 63-byte identifiers (the database name is shortened, not the suffix)."""
    room = 63 - len(suffix.encode())
    base = dbname.encode()[:room].decode("utf-8", "ignore")
    return base + suffix


def _db_exists(cur, name):
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    return cur.fetchone() is not None


def _drop_db(cur, name):
    try:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        return True
    except psycopg2.Error:
        return False


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


def _previous_copies(cur, dbname):
    """The <db>_pre_restore_* databases earlier restores kept: [{name, size_bytes}], oldest first."""
    like = dbname.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "\\_pre\\_restore\\_%"
    cur.execute("SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT') THEN pg_database_size(oid) END"
                "  FROM pg_database WHERE datname LIKE %s ORDER BY datname", (like,))
    return [{"name": r[0], "size_bytes": r[1]} for r in cur.fetchall()]


def _drop_how(admin_url):
    """Where a kept database is dropped from: the maintenance database, named without any URL or password."""
    admin = Target(admin_url)
    return {"host": admin.host, "port": admin.port, "user": admin.user, "dbname": admin.dbname, "target": admin.name}


def _drop_command(how, name):
    """psql command dropping a kept database (host, port, user and database names only: no URL, no password)."""
    return "psql -h %s -p %s -U %s -d %s -c %s" % (
        shlex.quote(str(how["host"])), how["port"], shlex.quote(str(how["user"])), shlex.quote(str(how["dbname"])),
        shlex.quote('DROP DATABASE "%s"' % name.replace('"', '""')))


def _copies_advice(copies, how):
    if not copies:
        return "Free space on the server (or restore on another one), then re-run"
    total = sum(c["size_bytes"] or 0 for c in copies)
    names = ", ".join("%s (%s)" % (c["name"], human_bytes(c["size_bytes"])) for c in copies[:5])
    if len(copies) > 5:
        names += " and %d more" % (len(copies) - 5)
    return ("%d database(s) kept by earlier restores hold %s: %s. Drop those no longer needed (after checking "
            "that nothing written to them is still wanted), e.g.: %s" % (
                len(copies), human_bytes(total), names, _drop_command(how, copies[0]["name"])))


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


def run_restore(params, check_mode=False):
    p = _defaults(params)
    started = time.time()
    url = p["database_url"]
    target = describe_target(url)
    host = p.get("host_label")
    dbname = Target(url).dbname
    if dbname == p["maintenance_db"]:
        raise LedgerError("the target database %s is also the maintenance database the restore connects to for the "
                          "swap: set rollback_maintenance_db to another one (e.g. template1). Nothing was changed"
                          % dbname)
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
            space["previous_copies"] = _previous_copies(cur, dbname)
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
            new_db = _short_name(dbname, "_restore_%s" % stamp)
            old_db = _short_name(dbname, "_pre_restore_%s" % stamp)
            n = 2
            while _db_exists(cur, new_db) or _db_exists(cur, old_db):
                new_db = _short_name(dbname, "_restore_%s_%d" % (stamp, n))
                old_db = _short_name(dbname, "_pre_restore_%s_%d" % (stamp, n))
                n += 1
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
    try:
        with admin.cursor() as cur:
            # 2. The copy: a new database like the current one, restored with --exit-on-error.
            try:
                _create_like(cur, new_db, props)
            except psycopg2.Error as exc:
                err = pg_error(exc)
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, "cannot create the database %s to restore %s into: %s. %s is "
                                "unchanged" % (new_db, path, format_pg_error(err), dbname),
                                dict(base, sqlstate=err["sqlstate"]))
            cmd = [os.path.join(bindir, "pg_restore"), "--exit-on-error", "--no-password"]
            if int(p.get("restore_jobs") or 1) > 1:
                cmd += ["--jobs=%d" % int(p["restore_jobs"])]
            with libpq_env(url, p["connect_timeout"]) as (env, conninfo):
                res = subprocess.run(cmd + ["--dbname=%s" % url_with_database(conninfo, new_db), path],
                                     capture_output=True, text=True, env=env, check=False, cwd="/")
            if res.returncode != 0:
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, (
                    "restore of %s failed half-way (pg_restore exited %d): %s. The partial copy %s was dropped; %s is "
                    "unchanged. Choose another backup (-e backup_file=PATH) or revert with the down scripts: %s"
                    % (path, res.returncode, redact(res.stderr.strip())[-1500:] or "no message", new_db, target,
                       _cmd(host, "-e rollback_to=<version>"))), dict(base, pg_restore_rc=res.returncode))
            # 3. Check the copy before it replaces anything.
            problems, counts = _check_copy(url_with_database(url, new_db), manifest, bindir, path, p)
            if problems:
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, (
                    "the restored copy of %s does not match its manifest: %s. It was dropped; %s is unchanged"
                    % (path, "; ".join(problems), target)), dict(base, problems=problems))
            # 4. The swap.
            terminated = _swap(cur, dbname, new_db, old_db, p, base, url, started)
            swapped = True
    finally:
        admin.close()
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
    drop_cmd = _drop_command(drop_how, old_db)
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


def _swap(cur, dbname, new_db, old_db, p, base, url, started):
    """Rename the current database away and the copy into its place, in one transaction.

    ALTER DATABASE ... RENAME refuses while anyone is connected to the database (55006). With
    terminate_connections, new connections are held off (ALLOW_CONNECTIONS false) while the client sessions are
    terminated; the setting is restored on the kept database whatever happens. Autovacuum workers are always
    terminated (they restart on their own); any other server process (a walsender, a background worker) that
    connected since the pre-check fails the swap, naming it: it is never terminated.
    """
    terminated = []
    deadline = time.time() + max(int(p.get("swap_timeout") or 15), 1)
    blocked = False
    try:
        if p.get("terminate_connections"):
            cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbname)))
            blocked = True
        while True:
            sessions = _sessions(cur, dbname)
            others = [s for s in sessions if s["backend_type"] not in CLIENT_BACKENDS + SELF_RESTARTING]
            if others:
                _drop_db(cur, new_db)
                _restore_failed(url, p, started, (
                    "the restored copy could not be swapped in for %s: server process(es) that are not client "
                    "sessions connected to it: %s. They are never terminated by the restore. The copy was dropped; "
                    "%s is unchanged. Stop them, then re-run" % (dbname, _describe_sessions(others),
                                                                 describe_target(url))),
                                dict(base, refused="server_processes", server_processes=others))
            for s in sessions:
                if s["backend_type"] in SELF_RESTARTING:
                    # Autovacuum workers don't belong to anyone; they restart on their own.
                    cur.execute("SELECT pg_terminate_backend(%s)", (s["pid"],))
                elif s["backend_type"] == "client backend" and p.get("terminate_connections"):
                    # A parallel worker goes with its leader.
                    cur.execute("SELECT pg_terminate_backend(%s)", (s["pid"],))
                    terminated.append(s)
            try:
                cur.execute("BEGIN")
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(dbname),
                                                                             sql.Identifier(old_db)))
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(new_db),
                                                                             sql.Identifier(dbname)))
                cur.execute("COMMIT")
                break
            except psycopg2.Error as exc:
                cur.execute("ROLLBACK")
                err = pg_error(exc)
                if err["sqlstate"] != "55006" or time.time() > deadline:
                    left = _sessions(cur, dbname)
                    _drop_db(cur, new_db)
                    _restore_failed(url, p, started, (
                        "the restored copy could not be swapped in for %s: %s%s. The copy was dropped; %s is "
                        "unchanged. %s" % (
                            dbname, format_pg_error(err), " (still connected: %s)" % _describe_sessions(left)
                            if left else "", describe_target(url),
                            "Re-run with the sessions stopped, or: %s" % _cmd(
                                p.get("host_label"), "-e rollback_mode=restore",
                                "-e rollback_terminate_connections=true")
                            if not p.get("terminate_connections") else "Re-run when they are gone")),
                        dict(base, sqlstate=err["sqlstate"], blocking_sessions=left))
                time.sleep(0.1 + random.random() * 0.1)
    finally:
        if blocked:
            # The kept database (renamed or not) accepts connections again.
            for name in (old_db, dbname):
                try:
                    cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
                except psycopg2.Error:
                    pass
    return terminated


# =========================================================================== entry point
