# -*- coding: utf-8 -*-
"""Databases restores leave beside their target: one home for their names, listing and dropping.

A restore creates ``<db>_restore_<stamp>_<tag>`` (the scratch copy it restores into) and, at the
swap, renames the target to ``<db>_pre_restore_<stamp>_<tag>`` (the database as it was, kept on
purpose). A restore that fails and survives drops its own scratch copy; one that was killed (or
lost its server) can't, so its scratch copy stays: a "leftover". Kept databases are the
operator's to drop. The precheck lists both kinds with their size and age; the rollback
playbook drops them with ``rollback_drop_leftovers=true``.
"""

from __future__ import annotations

import datetime
import re
import shlex
import time
import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target

try:
    import psycopg2
    from psycopg2 import sql
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
    sql = None

SCRATCH = "_restore_"
KEPT = "_pre_restore_"
_STAMP = re.compile(r"_(\d{14})(?:_[0-9a-z]+)?$")


def short_name(dbname, suffix):
    """`<db><suffix>` within PostgreSQL's 63-byte identifiers (the database name is shortened, not the suffix)."""
    room = 63 - len(suffix.encode())
    base = dbname.encode()[:room].decode("utf-8", "ignore")
    return base + suffix


def restore_names(dbname, now=None):
    """(scratch, kept) names of one restore: a UTC stamp and a random tag, so no two runs share one."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    tag = uuid.uuid4().hex[:6]
    return (short_name(dbname, "%s%s_%s" % (SCRATCH, stamp, tag)),
            short_name(dbname, "%s%s_%s" % (KEPT, stamp, tag)))


def _like(prefix):
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _age_s(name, now):
    m = _STAMP.search(name)
    if not m:
        return None
    try:
        then = datetime.datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    return max(0, int(now - then.timestamp()))


def leftover_databases(cur, dbname):
    """[{name, kind: scratch|kept, size_bytes, age_s, allows_connections}] of this target, oldest first.

    The size is read only where the role may connect (pg_database_size needs CONNECT); the age comes
    from the UTC stamp in the name (PostgreSQL keeps no creation time of a database).
    """
    cur.execute("SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT') THEN pg_database_size(oid) END,"
                "       datallowconn"
                "  FROM pg_database WHERE datname LIKE %s OR datname LIKE %s ORDER BY datname",
                (_like(dbname + SCRATCH), _like(dbname + KEPT)))
    now = time.time()
    out = []
    for name, size, allow in cur.fetchall():
        if not _STAMP.search(name):
            continue
        kind = "kept" if name.startswith(dbname + KEPT) else "scratch"
        out.append({"name": name, "kind": kind, "size_bytes": size, "age_s": _age_s(name, now),
                    "allows_connections": allow})
    out.sort(key=lambda d: (-(d["age_s"] or 0), d["name"]))
    return out


def drop_how(admin_url):
    """Where a database is dropped from: the maintenance database, named without any URL or password."""
    admin = Target(admin_url)
    return {"host": admin.host, "port": admin.port, "user": admin.user, "dbname": admin.dbname, "target": admin.name}


def drop_command(how, name):
    """psql command dropping a database (host, port, user and database names only: no URL, no password)."""
    return "psql -h %s -p %s -U %s -d %s -c %s" % (
        shlex.quote(str(how["host"])), how["port"], shlex.quote(str(how["user"])), shlex.quote(str(how["dbname"])),
        shlex.quote('DROP DATABASE "%s" WITH (FORCE)' % name.replace('"', '""')))


def drop_database(cur, name):
    """DROP DATABASE IF EXISTS name WITH (FORCE): (True, None) once it is gone, else (False, the error)."""
    try:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        return True, None
    except psycopg2.Error as exc:
        return False, (str(exc).strip().splitlines() or ["unknown error"])[0]


def describe(items, limit=6):
    """`name (kind, 1.2 GB, 3h old)` for each, for a message."""
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
    out = []
    for d in items[:limit]:
        age = d["age_s"]
        age_text = ("%dd" % (age // 86400) if age >= 86400 else "%dh" % (age // 3600) if age >= 3600
                    else "%dm" % (age // 60)) if age is not None else "age unknown"
        out.append("%s (%s, %s, %s old)" % (d["name"], "scratch copy of a restore that did not finish"
                                          if d["kind"] == "scratch" else "kept by a restore",
                                          human_bytes(d["size_bytes"]) if d["size_bytes"] is not None
                                          else "size unknown", age_text))
    if len(items) > limit:
        out.append("and %d more" % (len(items) - limit))
    return "; ".join(out)
