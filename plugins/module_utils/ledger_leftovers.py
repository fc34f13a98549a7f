# -*- coding: utf-8 -*-
"""Databases restores leave beside their target: one home for their names, listing and dropping.

A restore creates ``<db>_restore_<stamp>_<tag>`` (the scratch copy it restores into) and, at the
swap, renames the target to ``<db>_pre_restore_<stamp>_<tag>`` (the database as it was, kept on
purpose). A restore that fails and survives drops its own scratch copy; one that was killed (or
lost its server) can't, so its scratch copy stays: a "leftover". A kept database holds the rows
written to the target after the backup its restore used, which no other database holds: the
operator's to drop, by a consent of its own. The precheck lists both kinds with their size and age;
the rollback playbook drops the scratch copies with ``rollback_drop_leftovers=true`` and the kept
databases with ``rollback_drop_kept=true`` only.
"""

from __future__ import annotations

import datetime
import re
import time
import uuid

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import (
    cleanup_command, psql_command)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target

try:
    import psycopg2
    from psycopg2 import sql
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None
    sql = None

SCRATCH = "_restore_"
KEPT = "_pre_restore_"
# The rollback playbook's consent to drop each kind (role variables; the module's drop_leftovers / drop_kept).
DROP_FLAG = {"scratch": "rollback_drop_leftovers", "kept": "rollback_drop_kept"}
_STAMP = re.compile(r"_(\d{14})(?:_[0-9a-z]+)?$")


def short_name(dbname, suffix):
    """`<db><suffix>` within PostgreSQL's 63-byte identifiers (the database name is shortened, not the suffix)."""
    room = 63 - len(suffix.encode())
    base = dbname.encode()[:room].decode("utf-8", "ignore")
    return base + suffix


def restore_names(dbname, now=None, tag=None):
    """(scratch, kept) names of one restore: a UTC stamp and a tag (its lease's, else random), so no two runs
    share one, and the cleanup knows the scratch copy of the run holding the lease by its tag."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    tag = tag or uuid.uuid4().hex[:6]
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
    return psql_command(how["host"], how["port"], how["user"], how["dbname"],
                        'DROP DATABASE "%s" WITH (FORCE)' % name.replace('"', '""'))


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
        kind = "scratch copy of a restore that did not finish" if d["kind"] == "scratch" else "kept by a restore"
        size = human_bytes(d["size_bytes"]) if d["size_bytes"] is not None else "size unknown"
        out.append("%s (%s, %s, %s old)" % (d["name"], kind, size, age_text))
    if len(items) > limit:
        out.append("and %d more" % (len(items) - limit))
    return "; ".join(out)


def kept_loss(dbname, backup="the backup its restore used"):
    """What dropping a kept database loses: said wherever its drop is offered, before the command."""
    return ("it holds the rows written to %s after %s, which no other database holds: dropping it loses them"
            % (dbname, backup))


def drop_command_of(kind, host_label=None):
    """The rollback playbook's command that drops every database of this kind of the target, and nothing else."""
    return cleanup_command(host_label, "-e %s=true" % DROP_FLAG[kind])


def drop_advice(items, dbname, host_label=None):
    """How to drop the databases found and left, kind by kind: a kept one says what it holds first."""
    kinds = set(d["kind"] for d in items)
    out = []
    if "scratch" in kinds:
        out.append("drop the scratch copies (nothing uses them): %s" % drop_command_of("scratch", host_label))
    if "kept" in kinds:
        out.append("each kept database is kept on purpose: %s; drop the kept databases only once none of those "
                   "rows is wanted: %s" % (kept_loss(dbname), drop_command_of("kept", host_label)))
    return "; ".join(out)


def leftovers_check(cur, dbname, host_label=None):
    """The precheck's restore_leftovers check: informational (never fails the run), naming each with size and age."""
    found = leftover_databases(cur, dbname)
    if not found:
        return {"name": "restore_leftovers", "passed": True, "observed": [], "threshold": None, "offenders": [],
                "message": "no scratch or kept databases of %s from earlier restores" % dbname, "next": None}
    scratch = [d for d in found if d["kind"] == "scratch"]
    return {"name": "restore_leftovers", "passed": True, "observed": found, "threshold": None, "offenders": found,
            "message": "%d database(s) of %s left by earlier restores: %s%s" % (
                len(found), dbname, describe(found),
                "; the scratch copies are of restores that were interrupted (nothing uses them)" if scratch else ""),
            "next": drop_advice(found, dbname, host_label)}


def lease_check(cur, dbname):
    """The precheck's run_lease check: informational; who holds the target's run lease now.

    A run killed while holding it (a restore killed at its swap holds it longest: its TTL plus the
    swap's allowance) leaves the row until it expires: a run started now waits for it, then takes it over.
    """
    cur.execute("SELECT to_regclass('migrations.lock') IS NOT NULL")
    row = None
    if cur.fetchone()[0]:
        cur.execute("SELECT run_id, holder, extract(epoch FROM now() - acquired_at)::int,"
                    " extract(epoch FROM now() - renewed_at)::int, extract(epoch FROM expires_at - now())::int"
                    "  FROM migrations.lock WHERE id = 1")
        row = cur.fetchone()
    if row is None:
        return {"name": "run_lease", "passed": True, "observed": None, "threshold": None, "offenders": [],
                "message": "the run lease of %s is free" % dbname, "next": None}
    run_id, holder, age, renewed, expires_in = row
    observed = {"run_id": run_id, "holder": holder, "age_s": age, "renewed_s_ago": renewed,
                "expires_in_s": expires_in}
    if expires_in <= 0:
        state = "expired %ss ago: the next run takes it over" % -expires_in
    else:
        state = ("expires in %ss: a run started now waits for it (within its lock_wait); if that run is no longer "
                 "running (stopped, killed), its lease expires by itself and the next run takes it over" % expires_in)
    return {"name": "run_lease", "passed": True, "observed": observed, "threshold": None, "offenders": [observed],
            "message": "the run lease of %s is held by run %s (%s), taken %ss ago, renewed %ss ago, %s" % (
                dbname, run_id, holder, age, renewed, state), "next": None}


def diagnose_refused(url, maintenance_db, connect_timeout, host_label=None):
    """Why the target refuses connections when its server answers: (message, next) or None.

    Connects through the maintenance database and reads the target's pg_database row: a database with
    datallowconn = false (left by an interrupted restore of an older version, or set by hand) refuses
    every connection with a message that looks like an access problem.
    """
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
        LedgerError, connect, url_with_database)
    dbname = Target(url).dbname
    if not dbname or dbname == maintenance_db:
        return None
    try:
        conn = connect(url_with_database(url, maintenance_db), autocommit=True, connect_timeout=connect_timeout)
    except LedgerError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datallowconn, datconnlimit FROM pg_database WHERE datname = %s", (dbname,))
            row = cur.fetchone()
            if row is None:
                kept = [d["name"] for d in leftover_databases(cur, dbname) if d["kind"] == "kept"]
                return ("the database %s does not exist on this server (reached through %s)%s" % (
                    dbname, maintenance_db, "; databases kept by restores: %s" % ", ".join(kept) if kept else ""),
                    "check database_url; if a restore's swap was done by hand halfway, rename a kept database back")
            allow, limit = row
            if not allow:
                return ("the database %s refuses every connection: its datallowconn is false (left by an interrupted "
                        "restore of an older version of this project, or set by hand)" % dbname,
                        "allow connections again: %s (or: ALTER DATABASE \"%s\" ALLOW_CONNECTIONS true)" % (
                            cleanup_command(host_label, "-e rollback_allow_connections=true"),
                            dbname.replace('"', '""')))
            if limit == 0:
                return ("the database %s refuses every connection: its CONNECTION LIMIT is 0" % dbname,
                        "ALTER DATABASE \"%s\" CONNECTION LIMIT -1, then re-run" % dbname.replace('"', '""'))
            return None
    finally:
        conn.close()


def _live_holder(url, connect_timeout):
    """Who holds the target's run lease now (check mode takes none), or None; nothing is written."""
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, connect
    try:
        conn = connect(url, autocommit=True, connect_timeout=connect_timeout)
    except LedgerError:
        return None
    try:
        with conn.cursor() as cur:
            return lease_check(cur, Target(url).dbname)["observed"]
    finally:
        conn.close()


def run_cleanup(p, check_mode=False):
    """mode=cleanup: allow connections again (with consent) and drop the leftovers (each kind with its consent).

    drop_leftovers drops the scratch copies, drop_kept the kept databases; a database found and not asked
    for is listed as left, with the command that drops it (a kept one: what it holds first). Runs on the
    maintenance database; a database is said dropped only once DROP DATABASE returned. The drop runs
    under the target's run lease (the one restore, migrate and revert take): a restore in progress holds
    it, so the cleanup waits for it (or refuses naming it) and never drops its scratch copy. A database
    tagged with the lease's previous holder (a lease taken over on expiry, whose run may still be alive)
    is kept all the same.
    """
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
        LedgerError, connect, describe_target, url_with_database)
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_restore_lease import (
        lease_tag, take_restore_lease)
    url = p["database_url"]
    dbname = Target(url).dbname
    if dbname == p["maintenance_db"]:
        raise LedgerError("the target database %s is also the maintenance database: set rollback_maintenance_db to "
                          "another one (e.g. template1). Nothing was changed" % dbname)
    admin_url = url_with_database(url, p["maintenance_db"])
    how = drop_how(admin_url)
    asked = {"scratch": bool(p.get("drop_leftovers")), "kept": bool(p.get("drop_kept"))}
    conn = connect(admin_url, autocommit=True, connect_timeout=p["connect_timeout"])
    out = {"target": describe_target(url), "changed": False, "dropped": [], "not_dropped": [], "leftovers": [],
           "left": [], "in_use": [], "connections_allowed": None}
    said = []
    lease = None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (dbname,))
            row = cur.fetchone()
            if row is not None and not row[0]:
                if p.get("allow_connections"):
                    if not check_mode:
                        cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(dbname)))
                    out["connections_allowed"] = True
                    out["changed"] = True
                    said.append("%s %s connections again" % (dbname, "would accept" if check_mode else "accepts"))
                else:
                    out["connections_allowed"] = False
                    said.append("%s refuses connections (datallowconn false): -e rollback_allow_connections=true "
                                "allows them again" % dbname)
            live = None
            if any(asked.values()):
                if check_mode:
                    live = _live_holder(url, p["connect_timeout"])
                else:
                    # Before listing: a restore in progress is waited for (or named), never dropped under.
                    lease = take_restore_lease(p, "cleanup", " ".join(
                        "-e %s=true" % DROP_FLAG[kind] for kind in ("scratch", "kept") if asked[kind]))
                    live = lease.takeover
            tag = lease_tag(live["holder"]) if live else None
            found = leftover_databases(cur, dbname)
            out["leftovers"] = found
            for d in found:
                if not asked[d["kind"]]:
                    out["left"].append(d)
                elif tag and d["name"].endswith("_" + tag):
                    out["in_use"].append(dict(d, run_id=live["run_id"], holder=live["holder"]))
                elif check_mode:
                    out["dropped"].append(d)
                else:
                    ok, error = drop_database(cur, d["name"])
                    if ok:
                        out["dropped"].append(d)
                    else:
                        out["not_dropped"].append(dict(d, error=error, command=drop_command(how, d["name"])))
            out["changed"] = out["changed"] or bool(out["dropped"])
    finally:
        if lease is not None and lease.held:
            lease.release()
        conn.close()
    if out["dropped"]:
        said.append("%s: %s" % ("would drop" if check_mode else "dropped", describe(out["dropped"], limit=20)))
    if out["left"]:
        said.append("left as they are (not asked to drop): %s; %s" % (
            describe(out["left"], limit=20), drop_advice(out["left"], dbname, p.get("host_label"))))
    for d in out["in_use"]:
        said.append("kept %s: the %s of run %s (%s), which %s the run lease; run the cleanup again once it is done"
                    % (d["name"], "scratch copy" if d["kind"] == "scratch" else "database kept by the restore",
                       d["run_id"], d["holder"], "holds" if check_mode else "held until it expired"))
    if out["not_dropped"]:
        said.append("could NOT drop: %s" % "; ".join("%s (%s): %s" % (d["name"], d["error"], d["command"])
                                                     for d in out["not_dropped"]))
    if not found and out["connections_allowed"] is None:
        said.append("no leftovers of restores of %s; it accepts connections" % dbname)
    out["msg"] = "; ".join(said)
    out["failed"] = bool(out["not_dropped"])
    return out
