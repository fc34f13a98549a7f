# -*- coding: utf-8 -*-
"""The database a restore replaces, as the restore sees it: who is connected to it, the properties the new
database copies from it, and whether the server has room for a second copy of it."""

from __future__ import annotations

import os

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LEASE_APPLICATION
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_leftovers import (
    drop_command, drop_command_of, kept_loss)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target

try:
    from psycopg2 import sql
except ImportError:  # pragma: no cover - reported by connect()
    sql = None


def target_sessions(cur, dbname):
    cur.execute(
        "SELECT pid, usename, application_name, coalesce(host(client_addr), 'local'), state, backend_type,"
        "       extract(epoch FROM now() - backend_start)::int, left(regexp_replace(query, '\\s+', ' ', 'g'), 80)"
        "  FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() ORDER BY backend_start", (dbname,))
    return [{"pid": r[0], "user": r[1], "application_name": r[2], "client": r[3], "state": r[4],
             "backend_type": r[5], "connected_s": r[6], "query": r[7]} for r in cur.fetchall()]


def lease_connection(session):
    """A short connection of the run lease (a waiter's poll, this restore's own beat just closed): it lasts
    milliseconds and holds nothing, so the restore neither refuses for it nor terminates it (the swap's
    RENAME waits up to 5 s for such a session to go)."""
    return session["backend_type"] == "client backend" and session["application_name"] == LEASE_APPLICATION


def describe_sessions(rows, limit=8):
    out = ["pid %s (%s, %s, from %s, %s, %ss)" % (r["pid"], r["user"], r["application_name"] or r["backend_type"],
                                                  r["client"], r["state"] or r["backend_type"], r["connected_s"])
           for r in rows[:limit]]
    if len(rows) > limit:
        out.append("and %d more" % (len(rows) - limit))
    return "; ".join(out)


def db_properties(cur, dbname):
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


def create_like(cur, new_db, props):
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


def db_exists(cur, name):
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    return cur.fetchone() is not None


# Backends a restore deals with: client sessions (terminated only with terminate_connections; a parallel worker
# goes with its leader) and autovacuum workers (terminated at the swap: they restart on their own). Any other
# process connected to the database (a walsender of logical replication, a background worker) refuses the restore.
CLIENT_BACKENDS = ("client backend", "parallel worker")
SELF_RESTARTING = ("autovacuum worker",)
# Hosts whose server's data directory can be this machine's (free space measurable with statvfs).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def restore_space(cur, url, props, margin):
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


def copies_advice(copies, how, dbname, host_label=None):
    """The databases kept by earlier restores, what each holds, and how to drop one or all of them."""
    if not copies:
        return "Free space on the server (or restore on another one), then re-run"
    total = sum(c["size_bytes"] or 0 for c in copies)
    names = ", ".join("%s (%s)" % (c["name"], human_bytes(c["size_bytes"])) for c in copies[:5])
    if len(copies) > 5:
        names += " and %d more" % (len(copies) - 5)
    return ("%d database(s) kept by earlier restores hold %s: %s. Each is kept on purpose: %s. Drop those whose rows "
            "are no longer wanted, one by one, e.g.: %s; or every kept database of %s at once: %s" % (
                len(copies), human_bytes(total), names, kept_loss(dbname), drop_command(how, copies[0]["name"]),
                dbname, drop_command_of("kept", host_label)))


def describe_space(space, props):
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
