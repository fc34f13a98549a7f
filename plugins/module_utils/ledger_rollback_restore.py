# -*- coding: utf-8 -*-
"""ledger_rollback's restore: a verified backup restored into a new database, checked, then swapped in by rename.

The database it replaces (sessions, properties, room for a copy) is ledger_restore_target's; the run lease
as a restore takes it is ledger_restore_lease's; the databases restores leave behind, ledger_leftovers'.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target, ensure_records, format_pg_error, log_event, pg_error, redact, redact_obj,
    url_with_database,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_leftovers import (
    drop_command, drop_command_of, drop_database, drop_how as _drop_how, kept_loss, leftover_databases, restore_names,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_lifeline import (
    Lifeline, child_preexec, interruptible_waits,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    find_bindir, find_newest_verified, full_read_check, human_bytes, libpq_env, list_manifests,
    manifest_path_for, read_manifest, same_target, server_identity, target_slug, verify_against_manifest,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_restore_lease import take_restore_lease
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_restore_target import (
    CLIENT_BACKENDS, SELF_RESTARTING, copies_advice, create_like, db_exists, db_properties, describe_sessions,
    describe_space, lease_connection, restore_space, target_sessions,
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
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import extra_var


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
                                  _cmd(host, "-e rollback_mode=restore", extra_var("backup_file", path),
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
    return ("%s %s could NOT be dropped (%s): it is still on the server; drop it with: %s, or with: %s"
            % (what, name, redact(error or "no connection"), drop_command(how, name),
               drop_command_of("scratch", p.get("host_label")))), False


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
        with interruptible_waits():
            lease = take_restore_lease(p)
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
            props = db_properties(cur, dbname)
            if props is None:
                raise LedgerError("database %s does not exist on %s: nothing to restore over (create it, or restore "
                                  "by hand with pg_restore --create)" % (dbname, describe_target(admin_url)))
            if not can_create:
                raise LedgerError("the role connecting to %s can't CREATE DATABASE: the restore goes into a new "
                                  "database swapped in by name; grant CREATEDB (or run it as the database owner with "
                                  "CREATEDB). Nothing was changed" % target)
            sessions = target_sessions(cur, dbname)
            space = restore_space(cur, url, props, float(p.get("restore_space_margin") or 1.2))
            leftovers = leftover_databases(cur, dbname)
            space["previous_copies"] = [{"name": d["name"], "size_bytes": d["size_bytes"]}
                                        for d in leftovers if d["kind"] == "kept"]
            # Unique per run (a stamp and the lease's tag, random): two restores never share a scratch copy, and
            # the cleanup knows the scratch copy of the run holding the lease by its tag (and never drops it).
            new_db, old_db = restore_names(dbname, tag=lease.tag if lease is not None else None)
            while db_exists(cur, new_db) or db_exists(cur, old_db):
                new_db, old_db = restore_names(dbname)
    finally:
        admin.close()
    clients = [s for s in sessions if s["backend_type"] in CLIENT_BACKENDS and not lease_connection(s)]
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
                                                                describe_sessions(others)),
            **dict(base, refused="server_processes", server_processes=others))
    if space["free_bytes"] is not None and space["free_bytes"] < space["needed_bytes"]:
        raise LedgerError(
            "refusing to restore %s: the copy needs about %s free (%s database x %s) where the server keeps it (%s), "
            "which has %s free. Nothing was changed. %s" % (
                target, human_bytes(space["needed_bytes"]), human_bytes(props["size"]), space["margin"],
                space["path"], human_bytes(space["free_bytes"]),
                copies_advice(space["previous_copies"], drop_how, dbname, host)),
            **dict(base, refused="space"))
    if clients and not p.get("terminate_connections"):
        raise LedgerError(
            "refusing to restore %s: %d session(s) are connected to %s and the restored database can only be swapped "
            "in when they are gone: %s. Nothing was changed. Stop them (the application, PgBouncer: PAUSE), or let the "
            "restore terminate them: %s" % (target, len(clients), dbname, describe_sessions(clients),
                                            _cmd(host, "-e rollback_mode=restore",
                                                 "-e rollback_terminate_connections=true")),
            **dict(base, refused="sessions"))
    if check_mode:
        return dict(base, changed=True, msg=(
            "would restore %s (sha256 %s verified against its manifest, read in full; taken %s at version %s) into a "
            "new database %s, check it, then swap it in for %s and keep the current one as %s; %s%s%s" % (
                path, (manifest.get("sha256") or "")[:12], manifest.get("started_at"),
                manifest.get("schema_version") or "base", new_db, dbname, old_db, describe_space(space, props),
                "; would terminate %d session(s): %s" % (len(clients), describe_sessions(clients)) if clients else
                "", "; the backup is of another target (%s), restored as asked" % manifest.get("target")
                if manifest.get("other_target") else "")))

    admin = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
    swapped = False
    cur = None
    try:
        cur = admin.cursor()
        # 2. The copy: a new database like the current one, restored with --exit-on-error.
        try:
            create_like(cur, new_db, props)
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
        # The swap takes at most swap_timeout plus one RENAME's 5 s wait for sessions to exit; a lease parked
        # for that (and 5 s more) and then abandoned by a kill still expires within a next run's default
        # lock_wait (TTL + 30 s) when swap_timeout is at most 20 s (default 15).
        lease.park(max(int(p.get("swap_timeout") or 15), 1) + 10)
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
            len(space["previous_copies"]), copies_advice(space["previous_copies"], drop_how, dbname, host)))
    return dict(base, changed=swapped, terminated=terminated, event_logged=logged, row_counts=counts,
                warnings=warnings,
                duration_s=round(duration_ms / 1000.0, 3), drop_previous=drop_cmd,
                msg="restored %s into %s (version %s, taken %s; sha256 verified); the database as it was is kept as "
                    "%s: %s; drop it only once none of them is wanted: %s%s" % (
                        path, target, manifest.get("schema_version") or "base", manifest.get("started_at"), old_db,
                        kept_loss(dbname, "this backup was taken"), drop_cmd,
                        "; terminated %d session(s)" % len(terminated) if terminated else ""))


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
        sessions = target_sessions(cur, dbname)
        others = [s for s in sessions if s["backend_type"] not in CLIENT_BACKENDS + SELF_RESTARTING]
        if others:
            cleanup, dropped = _drop_scratch(cur, admin_url, new_db, how, p, "The restored copy")
            _restore_failed(url, p, started, (
                "the restored copy could not be swapped in for %s: server process(es) that are not client "
                "sessions connected to it: %s. They are never terminated by the restore. %s; "
                "%s is unchanged. Stop them, then re-run"
                % (dbname, describe_sessions(others), cleanup, describe_target(url))),
                dict(base, refused="server_processes", server_processes=others, scratch_dropped=dropped))
        try:
            cur.execute("BEGIN")
            for s in sessions:
                # Autovacuum workers don't belong to anyone; they restart on their own. A parallel worker
                # goes with its leader.
                if s["backend_type"] in SELF_RESTARTING or (
                        s["backend_type"] == "client backend" and p.get("terminate_connections")
                        and not lease_connection(s)):
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
                left = target_sessions(cur, dbname) if not cur.connection.closed else []
                cleanup, dropped = _drop_scratch(cur, admin_url, new_db, how, p, "The restored copy")
                _restore_failed(url, p, started, (
                    "the restored copy could not be swapped in for %s: %s%s. %s; %s is "
                    "unchanged. %s" % (
                        dbname, format_pg_error(err), " (still connected: %s)" % describe_sessions(left)
                        if left else "", cleanup, describe_target(url),
                        "Re-run with the sessions stopped, or: %s" % _cmd(
                            p.get("host_label"), "-e rollback_mode=restore",
                            "-e rollback_terminate_connections=true")
                        if not p.get("terminate_connections") else "Re-run when they are gone")),
                    dict(base, sqlstate=err["sqlstate"], blocking_sessions=left, scratch_dropped=dropped))
            time.sleep(0.1)


# =========================================================================== entry point
