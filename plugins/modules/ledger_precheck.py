#!/usr/bin/python
# -*- coding: utf-8 -*-
"""The runbook's pre-migration checklist, automated and stricter: every check in one call."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ledger_precheck
short_description: Run every pre-migration check on a PostgreSQL target and report them all
description:
  - Runs all checks of the pre-migration checklist in one call and returns each with its name,
    whether it passed, the observed value, the threshold and the offending sessions; then fails
    when any check failed, with a message listing each failed check and the next command.
  - "Read-only, except two things it does only in a real run after every check passed, and reports
    as changed: it creates the missing backup directory (0700) when something is pending, and,
    only when O(terminate_idle_minutes) is set, it terminates idle sessions older than that
    (never its own) and lists each."
  - Records a C(precheck) event in C(migrations.events) on real runs when the records exist
    (or, for a passing run, when something is pending). C(--check) writes nothing.
options:
  database_url: {description: libpq URI of the target., type: str, required: true}
  migrations_dir: {description: Directory of the migration set (NNNN_name.sql)., type: path}
  target: {description: Highest version to apply (default the newest in the set)., type: str}
  allow_out_of_order: {description: Accept pending files older than the newest applied one., type: bool, default: false}
  rehearse: {description: Rehearse the pending migrations in a rolled-back transaction., type: bool, default: true}
  rehearse_statement_timeout:
    description:
      - statement_timeout of each rehearsed statement (PostgreSQL units, e.g. 30s, 500ms, 2min).
      - A statement that runs longer is cancelled and the check reports the set as not fully rehearsed.
    type: str
    default: 30s
  rehearse_lock_timeout:
    description:
      - lock_timeout of the rehearsal; a lock not obtained in time is not retried, the check reports
        the set as not fully rehearsed (the rehearsal never queues production traffic for longer).
    type: str
    default: 2s
  accepted_versions: {description: Accepted PostgreSQL major versions., type: list, elements: int, default: [15]}
  app_role: {description: The application role that must exist with LOGIN., type: str, default: arrakis_app}
  required_roles: {description: Roles the migration set needs., type: list, elements: str, default: [arrakis_app, arrakis_admin]}
  max_connections: {description: Client connections must stay below this (default 80% of the server's max_connections)., type: int}
  pgbouncer_admin_url: {description: libpq URI of PgBouncer's admin console (database pgbouncer)., type: str}
  pgbouncer_max_waiting: {description: Highest acceptable number of waiting PgBouncer clients., type: int, default: 0}
  pgbouncer_max_server_connections: {description: Highest acceptable number of PgBouncer server connections (none to only report)., type: int}
  long_tx_seconds: {description: Age above which an active transaction or an idle-in-transaction session refuses the run., type: int, default: 300}
  lock_schemas: {description: Schemas whose relations must have no queued lock waits., type: list, elements: str, default: [public, app, migrations]}
  lock_tables: {description: More relations (schema.table) to watch; the pending SQL's tables are added., type: list, elements: str, default: []}
  max_replication_lag: {description: Highest acceptable replay lag of a replica in seconds., type: float, default: 60}
  backup_dir: {description: Where the backup goes (checked for space, writability and mode)., type: path}
  backup_space_margin: {description: Free space needed as a multiple of the database size., type: float, default: 1.2}
  environment: {description: The environment (production requires a maintenance window)., type: str, default: unknown}
  maintenance_window_ack: {description: Explicit acknowledgement of the maintenance window., type: bool, default: false}
  maintenance_window: {description: "Window {start: 'HH:MM', end: 'HH:MM', days: [mon, ...], timezone: UTC}.", type: dict}
  terminate_idle_minutes: {description: Opt-in remedy, terminate idle sessions older than this many minutes., type: float}
  run_id: {description: Run id for the event., type: str}
  rerun_command: {description: The command an operator runs after fixing a refusal., type: str}
  connect_timeout: {description: Seconds to wait for a connection., type: int, default: 10}
author: ledger-migrations
"""

EXAMPLES = r"""
- name: Check the target
  ledger_precheck:
    database_url: "{{ database_url }}"
    migrations_dir: files/migrations
    backup_dir: /var/backups/ledger/staging
"""

RETURN = r"""
checks: {description: "Every check: name, passed (true, false, or null when it could not run), observed, threshold, offenders, message, next.", type: list, returned: always}
failed_checks: {description: Names of the failed checks., type: list, returned: always}
pending: {description: Pending versions., type: list, returned: always}
applied: {description: Applied versions., type: list, returned: always}
schema_version: {description: Newest applied version (null when none)., type: str, returned: always}
terminated: {description: Sessions ended by terminate_idle_minutes (or that would be, in check mode)., type: list, returned: always}
"""

import datetime
import re
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.ledger_common import (
    APPLICATION_NAME, LedgerError, connect, describe_target, format_pg_error, log_event_autonomous, parse_url,
    pg_error, redact, redact_obj,
)
from ansible.module_utils.ledger_backup_utils import check_backup_dir, ensure_backup_dir, human_bytes

try:
    from ansible.module_utils import ledger_engine
    ENGINE_IMPORT_ERROR = None
except ImportError as _exc:  # the engine ships with the migrate stage
    ledger_engine = None
    ENGINE_IMPORT_ERROR = _exc

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None

ARGUMENT_SPEC = dict(
    database_url=dict(type="str", required=True, no_log=True),
    migrations_dir=dict(type="path"),
    target=dict(type="str"),
    allow_out_of_order=dict(type="bool", default=False),
    rehearse=dict(type="bool", default=True),
    rehearse_statement_timeout=dict(type="str", default="30s"),
    rehearse_lock_timeout=dict(type="str", default="2s"),
    accepted_versions=dict(type="list", elements="int", default=[15]),
    app_role=dict(type="str", default="arrakis_app"),
    required_roles=dict(type="list", elements="str", default=["arrakis_app", "arrakis_admin"]),
    max_connections=dict(type="int"),
    pgbouncer_admin_url=dict(type="str", no_log=True),
    pgbouncer_max_waiting=dict(type="int", default=0),
    pgbouncer_max_server_connections=dict(type="int"),
    long_tx_seconds=dict(type="int", default=300),
    lock_schemas=dict(type="list", elements="str", default=["public", "app", "migrations"]),
    lock_tables=dict(type="list", elements="str", default=[]),
    max_replication_lag=dict(type="float", default=60),
    backup_dir=dict(type="path"),
    backup_space_margin=dict(type="float", default=1.2),
    environment=dict(type="str", default="unknown"),
    maintenance_window_ack=dict(type="bool", default=False),
    maintenance_window=dict(type="dict"),
    terminate_idle_minutes=dict(type="float"),
    run_id=dict(type="str"),
    rerun_command=dict(type="str"),
    connect_timeout=dict(type="int", default=10),
)

QUERY_CHARS = 80
SESSION_COLUMNS = ("pid", "user", "application_name", "age_s", "query")
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _defaults(params):
    out = dict((k, v.get("default")) for k, v in ARGUMENT_SPEC.items())
    out.update(dict((k, v) for k, v in params.items() if v is not None))
    return out


def check(name, passed, observed=None, threshold=None, offenders=None, message="", next_step=None):
    return {"name": name, "passed": passed, "observed": observed, "threshold": threshold,
            "offenders": offenders or [], "message": message, "next": next_step}


def not_run(name, why, threshold=None):
    return check(name, None, "not checked", threshold, message="not checked: %s" % why)


def _sessions(cur, sql, args):
    cur.execute(sql, args)
    return [dict(zip(SESSION_COLUMNS, row)) for row in cur.fetchall()]


def _describe_sessions(rows, limit=5):
    parts = []
    for r in rows[:limit]:
        parts.append("pid %s user %s app %r %ss: %s" % (r["pid"], r["user"], r["application_name"] or "",
                                                       r["age_s"], r["query"] or ""))
    if len(rows) > limit:
        parts.append("and %d more" % (len(rows) - limit))
    return "; ".join(parts)


SESSION_SELECT = ("SELECT pid, usename, application_name, %s::int, left(regexp_replace(coalesce(query, ''), "
                  "'\\s+', ' ', 'g'), " + str(QUERY_CHARS) + ") FROM pg_stat_activity")


# --------------------------------------------------------------------------- server and roles

def check_version(facts, accepted):
    major = facts["server_major"]
    ok = major in accepted
    return check("server_version", ok, {"reachable": True, "server_version": facts["server_version"],
                                        "major": major}, {"accepted_majors": accepted},
                 message="PostgreSQL %s (major %s)%s" % (facts["server_version"], major,
                                                         "" if ok else ", not one of %s" % accepted),
                 next_step=None if ok else "point database_url at a PostgreSQL %s server, or add %s to "
                                           "precheck_accepted_versions after testing the set on it"
                                           % (" or ".join(map(str, accepted)), major))


def check_backup_privilege(cur):
    cur.execute("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
    user, superuser, bypassrls = cur.fetchone()
    unreadable = []
    if not superuser:
        cur.execute("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE c.relkind IN ('r', 'p', 'S', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                    " AND n.nspname NOT LIKE 'pg\\_%' AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1 LIMIT 50")
        unreadable = [r[0] for r in cur.fetchall()]
    ok = bool(superuser or bypassrls) and not unreadable
    observed = {"role": user, "superuser": superuser, "bypassrls": bypassrls, "unreadable_relations": unreadable}
    if superuser:
        msg = "%s is a superuser" % user
    elif bypassrls and not unreadable:
        msg = "%s has BYPASSRLS and SELECT on every relation" % user
    elif not bypassrls:
        msg = ("%s is neither superuser nor BYPASSRLS: pg_dump refuses tables with forced row-level security"
               % user)
    else:
        msg = "%s cannot read %d relation(s): %s" % (user, len(unreadable), ", ".join(unreadable[:10]))
    return check("backup_privilege", ok, observed, "superuser, or BYPASSRLS with SELECT on every relation",
                 [{"relation": r} for r in unreadable], msg,
                 None if ok else "run the migration as a role with BYPASSRLS (ALTER ROLE %s BYPASSRLS, as a "
                                 "superuser) or as the database owner's superuser" % user)


def check_roles(cur, app_role, required):
    names = sorted(set(required) | {app_role})
    cur.execute("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)", (names,))
    found = dict(cur.fetchall())
    app_ok = found.get(app_role) is True
    if app_role not in found:
        app_msg = "role %s does not exist" % app_role
        app_next = "create it: CREATE ROLE %s LOGIN PASSWORD '...'" % app_role
    elif not found[app_role]:
        app_msg = "role %s exists but cannot log in (NOLOGIN)" % app_role
        app_next = "ALTER ROLE %s LOGIN" % app_role
    else:
        app_msg, app_next = "role %s exists with LOGIN" % app_role, None
    app = check("app_role_login", app_ok, {"role": app_role, "exists": app_role in found,
                                           "login": found.get(app_role)}, "exists with LOGIN",
                message=app_msg, next_step=app_next)
    missing = [r for r in required if r not in found]
    roles = check("required_roles", not missing, {"present": sorted(r for r in required if r in found),
                                                  "missing": missing}, {"required": list(required)},
                  [{"role": r} for r in missing],
                  "all %d required roles exist" % len(required) if not missing else
                  "missing role(s): %s" % ", ".join(missing),
                  None if not missing else "create them (roles are cluster-wide): %s" % "; ".join(
                      "CREATE ROLE %s" % r for r in missing))
    return [app, roles]


# --------------------------------------------------------------------------- sessions

def check_connections(cur, threshold):
    cur.execute("SELECT count(*) FILTER (WHERE backend_type = 'client backend'),"
                " count(*) FILTER (WHERE backend_type = 'client backend' AND datname = current_database()),"
                " current_setting('max_connections')::int FROM pg_stat_activity")
    total, here, server_max = cur.fetchone()
    if threshold is None:
        threshold = max(1, int(server_max * 0.8))
    cur.execute("SELECT datname, usename, application_name, state, count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC LIMIT 10")
    groups = [{"database": r[0], "user": r[1], "application_name": r[2], "state": r[3], "count": r[4]}
              for r in cur.fetchall()]
    ok = total < threshold
    return check("connections", ok, {"client_connections": total, "this_database": here,
                                     "server_max_connections": server_max},
                 {"below": threshold}, [] if ok else groups,
                 "%d client connection(s) (%d on this database), threshold %d" % (total, here, threshold),
                 None if ok else "find the busiest clients in 'offenders'; end idle ones with "
                                 "-e precheck_terminate_idle_minutes=10 or wait for the load to drop")


def check_long_running(cur, seconds):
    rows = _sessions(cur, SESSION_SELECT % "extract(epoch FROM now() - coalesce(xact_start, query_start))" +
                     " WHERE pid <> pg_backend_pid() AND datname = current_database()"
                     " AND backend_type = 'client backend' AND state = 'active'"
                     " AND coalesce(xact_start, query_start) < now() - make_interval(secs => %s)"
                     " ORDER BY 4 DESC", (seconds,))
    return check("long_running_queries", not rows, {"count": len(rows)}, {"max_age_s": seconds}, rows,
                 "no active query in a transaction older than %d s" % seconds if not rows else
                 "%d active transaction(s) older than %d s: %s" % (len(rows), seconds, _describe_sessions(rows)),
                 None if not rows else "wait for them or cancel them (SELECT pg_cancel_backend(pid)) after checking "
                                       "with their owners; a migration's DDL would queue behind them")


def check_idle_in_transaction(cur, seconds):
    rows = _sessions(cur, SESSION_SELECT % "extract(epoch FROM now() - xact_start)" +
                     " WHERE pid <> pg_backend_pid() AND datname = current_database()"
                     " AND backend_type = 'client backend'"
                     " AND state IN ('idle in transaction', 'idle in transaction (aborted)')"
                     " AND xact_start < now() - make_interval(secs => %s) ORDER BY 4 DESC", (seconds,))
    return check("idle_in_transaction", not rows, {"count": len(rows)}, {"max_age_s": seconds}, rows,
                 "no session idle in transaction for more than %d s" % seconds if not rows else
                 "%d session(s) idle in transaction for more than %d s (they hold their locks): %s"
                 % (len(rows), seconds, _describe_sessions(rows)),
                 None if not rows else "end them after checking with their owners: SELECT pg_terminate_backend(%s)"
                                       % (rows[0]["pid"] if len(rows) == 1 else "pid"))


def check_lock_waits(cur, schemas, tables):
    cur.execute(
        "SELECT a.pid, a.usename, a.application_name, extract(epoch FROM now() - a.query_start)::int,"
        " left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), %s), l.mode, n.nspname, c.relname,"
        " pg_blocking_pids(a.pid)"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE NOT l.granted AND l.locktype IN ('relation', 'tuple') AND a.pid <> pg_backend_pid()"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND (n.nspname = ANY(%s) OR n.nspname || '.' || c.relname = ANY(%s)) ORDER BY 4 DESC",
        (QUERY_CHARS, list(schemas), list(tables)))
    rows = []
    for pid, user, app, age, query, mode, nsp, rel, blockers in cur.fetchall():
        rows.append({"pid": pid, "user": user, "application_name": app, "age_s": age, "query": query,
                     "waits_for": "%s on %s.%s" % (mode, nsp, rel), "blocked_by": list(blockers or [])})
    return check("lock_waits", not rows, {"count": len(rows)}, {"schemas": list(schemas), "tables": list(tables)},
                 rows, "no lock waits queued on the watched relations" if not rows else
                 "%d session(s) waiting for locks on the migrations' relations: %s" % (
                     len(rows), "; ".join("pid %s waits for %s, blocked by %s" % (r["pid"], r["waits_for"],
                                                                                 r["blocked_by"]) for r in rows[:5])),
                 None if not rows else "find what the blocking pids hold (SELECT * FROM pg_stat_activity WHERE pid = "
                                       "ANY(blocked_by)) and let it finish before migrating")


def check_pgbouncer(url, max_waiting, max_servers, connect_timeout):
    threshold = {"cl_waiting_at_most": max_waiting, "server_connections_at_most": max_servers}
    if not url:
        return check("pgbouncer", True, "not configured (pgbouncer_admin_url unset)", threshold,
                     message="PgBouncer not checked: precheck_pgbouncer_admin_url is not set")
    try:
        # The admin console speaks only the simple query protocol and has no transactions:
        # autocommit, and nothing but SHOW.
        conn = psycopg2.connect(url, connect_timeout=connect_timeout)
        conn.autocommit = True
    except psycopg2.Error as exc:
        return check("pgbouncer", False, {"reachable": False}, threshold,
                     message="cannot reach PgBouncer's admin console %s: %s" % (
                         describe_target(url), redact(str(exc)).strip()),
                     next_step="check precheck_pgbouncer_admin_url (database 'pgbouncer', a user listed in "
                               "admin_users or stats_users)")
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW POOLS")
            cols = [d[0] for d in cur.description]
            pools = [dict(zip(cols, row)) for row in cur.fetchall()]
            cur.execute("SHOW CONFIG")
            config = dict((row[0], row[1]) for row in cur.fetchall())
    except psycopg2.Error as exc:
        return check("pgbouncer", False, {"reachable": True}, threshold,
                     message="SHOW POOLS failed on %s: %s" % (describe_target(url), format_pg_error(pg_error(exc))),
                     next_step="give the user of precheck_pgbouncer_admin_url stats_users rights in pgbouncer.ini")
    finally:
        conn.close()
    pools = [p for p in pools if p.get("database") != "pgbouncer"]
    sv_keys = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
    totals = dict((k, sum(int(p.get(k) or 0) for p in pools)) for k in ("cl_active", "cl_waiting") + sv_keys)
    totals["server_connections"] = sum(totals[k] for k in sv_keys)
    totals["maxwait_s"] = max([int(p.get("maxwait") or 0) for p in pools] or [0])
    offenders = [{"database": p.get("database"), "user": p.get("user"), "cl_waiting": p.get("cl_waiting"),
                  "sv_active": p.get("sv_active"), "maxwait_s": p.get("maxwait"), "pool_mode": p.get("pool_mode")}
                 for p in pools if int(p.get("cl_waiting") or 0) > 0]
    problems = []
    leak = pgbouncer_leak(pools, config)
    if leak:
        problems.append(leak)
    if totals["cl_waiting"] > max_waiting:
        problems.append("%d client(s) waiting for a server connection (max wait %d s)" % (
            totals["cl_waiting"], totals["maxwait_s"]))
    if max_servers is not None and totals["server_connections"] > max_servers:
        problems.append("%d server connections, threshold %d" % (totals["server_connections"], max_servers))
    return check("pgbouncer", not problems, totals, threshold, offenders,
                 "; ".join(problems) if problems else
                 "PgBouncer: %d active client(s), none waiting beyond %d, %d server connection(s)" % (
                     totals["cl_active"], max_waiting, totals["server_connections"]),
                 None if not problems else
                 "set server_reset_query = DISCARD ALL and server_reset_query_always = 1 in pgbouncer.ini, reload"
                 " PgBouncer (RELOAD on its admin console) and re-run the precheck" if leak else
                 "the pool is saturated: wait for the load to drop before migrating")


def pgbouncer_leak(pools, config):
    """Why this PgBouncer could hand one client's session-level tenant context to another, or None.

    In transaction (or statement) pooling a server connection changes client between
    transactions. A client's `SET app.community_id` / set_config(..., false) outlives its
    transaction unless PgBouncer resets the connection after every transaction
    (server_reset_query_always = 1 with a reset that clears settings): the ledger's
    guarantee 7 relies on it (files/migrations/README.md)."""
    modes = set(p.get("pool_mode") for p in pools if p.get("pool_mode")) or {config.get("pool_mode")}
    if not modes & {"transaction", "statement"}:
        return None
    reset = (config.get("server_reset_query") or "").upper()
    always = str(config.get("server_reset_query_always") or "0")
    if always == "1" and ("DISCARD ALL" in reset or "RESET ALL" in reset):
        return None
    return ("PgBouncer in %s pooling does not reset server connections between clients (server_reset_query = %r,"
            " server_reset_query_always = %s): one client's session-level SET app.community_id would reach another"
            " client's transaction" % ("/".join(sorted(modes & {"transaction", "statement"})),
                                       config.get("server_reset_query") or "", always))


# --------------------------------------------------------------------------- replication

def check_replication(cur, max_lag):
    cur.execute("SELECT pg_is_in_recovery()")
    if cur.fetchone()[0]:
        standby = "the target is a standby (in recovery, read-only)"
        return [check("replication_lag", False, {"role": "standby"}, {"max_replay_lag_s": max_lag},
                      message=standby, next_step="point database_url at the primary"),
                not_run("replication_slots", "the target is a standby")]
    cur.execute("SELECT application_name, client_addr::text, state, sync_state, extract(epoch FROM replay_lag),"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint FROM pg_stat_replication ORDER BY 1")
    replicas = [{"application_name": r[0], "client_addr": r[1], "state": r[2], "sync_state": r[3],
                 "replay_lag_s": float(r[4]) if r[4] is not None else 0.0, "replay_lag_bytes": r[5]}
                for r in cur.fetchall()]
    lagging = [r for r in replicas if r["replay_lag_s"] > max_lag or r["state"] != "streaming"]
    if not replicas:
        lag = check("replication_lag", True, {"role": "primary", "replicas": 0}, {"max_replay_lag_s": max_lag},
                    message="no replicas")
    else:
        lag = check("replication_lag", not lagging,
                    {"role": "primary", "replicas": len(replicas),
                     "max_replay_lag_s": max(r["replay_lag_s"] for r in replicas)},
                    {"max_replay_lag_s": max_lag}, lagging,
                    "%d replica(s), replay lag at most %.1f s" % (len(replicas), max(r["replay_lag_s"] for r in replicas))
                    if not lagging else "%d of %d replica(s) lag more than %s s or are not streaming: %s" % (
                        len(lagging), len(replicas), max_lag,
                        ", ".join("%s %s %.1f s" % (r["application_name"], r["state"], r["replay_lag_s"])
                                  for r in lagging)),
                    None if not lagging else "wait for the replicas to catch up (pg_stat_replication) before "
                                             "migrating: DDL on the primary would add to the lag")
    cur.execute("SELECT slot_name, slot_type, database, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
                " FROM pg_replication_slots WHERE NOT active AND restart_lsn IS NOT NULL ORDER BY 1")
    slots = [{"slot_name": r[0], "slot_type": r[1], "database": r[2], "retained_wal_bytes": r[3]}
             for r in cur.fetchall()]
    slot = check("replication_slots", not slots, {"inactive_slots": len(slots)}, {"inactive_slots": 0}, slots,
                 "no inactive replication slot holds WAL" if not slots else
                 "%d inactive replication slot(s) hold WAL: %s" % (len(slots), ", ".join(
                     "%s (%s)" % (s["slot_name"], human_bytes(s["retained_wal_bytes"])) for s in slots)),
                 None if not slots else "reconnect their consumer, or drop the slot if it is abandoned: "
                                        "SELECT pg_drop_replication_slot('%s')" % slots[0]["slot_name"])
    return [lag, slot]


# --------------------------------------------------------------------------- migrations (the engine)

IDENT = r'(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)'
TABLE_REF = re.compile(r"\b(?:TABLE|ON|REFERENCES|INTO|UPDATE|VIEW|INDEX\s+ON)\s+(?:ONLY\s+)?"
                       r"(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(" + IDENT + r")(?:\s*\.\s*(" + IDENT + r"))?", re.I)
SQL_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.S)
NOT_TABLES = {"delete", "update", "insert", "truncate", "select", "conflict", "commit", "each", "row", "statement",
              "function", "schema", "table", "column", "constraint", "database", "role", "all", "only", "public",
              "on", "view", "set", "of", "to", "from", "if", "not", "exists", "as", "with", "for", "returning",
              "nothing", "default", "values", "index", "trigger", "sequence", "type", "policy"}


def tables_in_sql(text):
    """Relations a migration names, roughly (schema.table; unqualified names count as public)."""
    out = set()
    for first, second in TABLE_REF.findall(SQL_COMMENTS.sub(" ", text)):
        schema, table = (first, second) if second else ("public", first)
        schema, table = schema.strip('"'), table.strip('"')
        if table.lower() in NOT_TABLES:
            continue
        out.add("%s.%s" % (schema if second else "public", table))
    return out


def check_migrations(conn, params):
    """migration_set and drift, from the engine (read-only). Returns (checks, state)."""
    state = {"applied": [], "pending": [], "pending_items": [], "tables": set(), "problem": False}
    directory = params.get("migrations_dir")
    if not directory:
        return [check("migration_set", True, "not configured", None,
                      message="no migrations_dir given: migration checks skipped")], state
    state["problem"] = True
    if ledger_engine is None:
        why = "the migration engine (module_utils/ledger_engine.py) is not importable: %s" % ENGINE_IMPORT_ERROR
        return [check("migration_set", False, {"directory": directory}, None, message=why,
                      next_step="install the project completely (make setup) and re-run"),
                not_run("drift", "engine missing")], state
    threshold = "files present, names NNNN_name.sql, versions unique, none out of order, target in the set"
    try:
        migrations = ledger_engine.load_migration_set(directory)
    except LedgerError as exc:
        return [check("migration_set", False, {"directory": directory}, threshold,
                      message=exc.msg, next_step="fix the migration set in %s" % directory),
                not_run("drift", "the migration set is invalid")], state
    if not len(migrations):
        return [check("migration_set", False, {"directory": directory, "files": 0}, threshold,
                      message="no migration files (NNNN_name.sql) in %s" % directory,
                      next_step="set migrations_dir to the directory of the NNNN_name.sql files"),
                not_run("drift", "no migrations")], state
    try:
        info = ledger_engine.inspect(conn, migrations, target=params.get("target") or None,
                                     allow_out_of_order=bool(params.get("allow_out_of_order")))
    except LedgerError as exc:
        return [check("migration_set", False, {"directory": directory, "files": len(migrations)}, threshold,
                      message=exc.msg, next_step="fix the migration set or the target, then re-run"),
                not_run("drift", "the set could not be inspected")], state
    applied = [row["version"] for row in info["applied"]]
    pending_items = list(info["pending"])
    pending = [m.version for m in pending_items]
    state.update(applied=applied, pending=pending, pending_items=pending_items)
    for m in pending_items:
        state["tables"] |= tables_in_sql(m.text or "")
    problems = [o["message"] for o in info["out_of_order"]]
    if info["target_problem"]:
        problems.append(info["target_problem"])
    observed = {"directory": directory, "files": len(migrations), "first": migrations[0].version,
                "last": migrations[-1].version, "applied": len(applied), "current": info["current"],
                "target": info["target"], "pending": pending}
    out = [check("migration_set", not problems, observed, threshold,
                 [{"problem": x} for x in problems],
                 "; ".join(problems) if problems else "%d file(s), %d applied, %d pending%s" % (
                     len(migrations), len(applied), len(pending), ": " + ", ".join(pending) if pending else ""),
                 None if not problems else "fix the set or the target (out-of-order files are allowed with "
                                           "-e migrate_allow_out_of_order=true), then re-run")]
    drift = info["drift"]
    drift_rows = [dict((k, d.get(k)) for k in ("version", "kind", "filename", "recorded_name",
                                               "recorded_checksum", "file_checksum", "message")) for d in drift]
    out.append(check("drift", not drift, {"drifted": len(drift)}, {"drifted": 0}, drift_rows,
                     "%d applied migration(s), checksums unchanged" % len(applied) if not drift else
                     "%d applied migration(s) differ from the set: %s" % (
                         len(drift), "; ".join(d["message"] for d in drift)),
                     None if not drift else "restore the applied files as they were applied, or accept an intended "
                                            "edit explicitly (see roles/migrate/README.md)"))
    state["problem"] = bool(problems or drift)
    return out, state


# SQLSTATEs that say the rehearsal met the server's load, not a defect of the SQL: the
# statement ran past the rehearsal's statement_timeout (or was cancelled), a lock was not
# obtained within its lock_timeout, or it deadlocked with application traffic.
NOT_REHEARSED_SQLSTATES = {"57014": "statement timeout or cancel", "55P03": "lock timeout",
                           "40P01": "deadlock with another session"}


def check_rehearsal(conn, url, params, state, session_failed):
    """Run the pending migrations in one rolled-back transaction (the engine's rehearsal).

    The rehearsal runs on production, so it is bounded: CONCURRENTLY statements are not
    rehearsed (without CONCURRENTLY an index build takes a SHARE lock, blocking writes for
    the whole build), every statement has the rehearsal's statement_timeout, locks its
    lock_timeout, and a lock timeout is not retried. A timeout, a cancel or a deadlock is
    reported as "could not be fully rehearsed", never as a defect of the file.
    """
    threshold = "every pending file applies (in a transaction that is rolled back)"
    pending_items = state["pending_items"]
    if not params.get("migrations_dir"):
        return None, None
    if not params.get("rehearse"):
        return check("rehearsal", True, "disabled (precheck_rehearse=false)", threshold,
                     message="rehearsal disabled"), None
    if state["problem"]:
        return not_run("rehearsal", "the migration set has problems (see migration_set and drift)", threshold), None
    if not pending_items:
        return check("rehearsal", True, {"pending": 0}, threshold, message="nothing pending to rehearse"), None
    if session_failed:
        return not_run("rehearsal", "%s failed: the rehearsal would wait for their locks" % ", ".join(
            session_failed), threshold), None
    limits = {"statement_timeout": params["rehearse_statement_timeout"],
              "lock_timeout": params["rehearse_lock_timeout"], "lock_retries": 0, "concurrently": "not rehearsed"}
    threshold = {"every_file": "applies in a transaction that is rolled back", "limits": limits}
    try:
        results = ledger_engine.rehearse(url, pending_items, lock_timeout=limits["lock_timeout"],
                                         statement_timeout=limits["statement_timeout"], lock_retries=0,
                                         rehearse_concurrently=False, run_id=params.get("run_id"),
                                         record_event=False, conn=conn)
    except LedgerError as exc:
        return check("rehearsal", False, {"pending": state["pending"]}, threshold, message=exc.msg,
                     next_step=exc.fields.get("next_command") or "re-run when the target is reachable"), None
    failed = [r for r in results if r["status"] == "would_fail"]
    lines = ledger_engine.format_rehearsal(results)
    offenders = [dict((k, r.get(k)) for k in ("version", "filename", "line", "sqlstate", "message", "hint",
                                              "statement")) for r in failed]
    skipped = [dict(x, filename=r["filename"]) for r in results for x in r.get("skipped_statements") or []]
    observed = {"rehearsed": len([r for r in results if r["status"] != "not_rehearsed"]),
                "would_apply": len([r for r in results if r["status"] == "would_apply"]),
                "would_fail": len(failed), "statements_not_rehearsed": len(skipped), "results": lines}
    not_rehearsed = ("; %d statement(s) not rehearsed (%s)" % (len(skipped), ", ".join(
        "%s line %s" % (x["filename"], x["line"]) for x in skipped[:5])) if skipped else "")
    if failed and failed[0].get("sqlstate") in NOT_REHEARSED_SQLSTATES:
        first = failed[0]
        observed["incomplete"] = True
        cause = NOT_REHEARSED_SQLSTATES[first["sqlstate"]]
        if first["sqlstate"] == "57014":
            limit = "statement_timeout %s" % limits["statement_timeout"]
        elif first["sqlstate"] == "55P03":
            limit = "lock_timeout %s" % limits["lock_timeout"]
        else:
            limit = "the server's deadlock detection"
        remaining = [r["filename"] for r in results if r["status"] == "not_rehearsed"]
        return check(
            "rehearsal", False, observed, threshold, offenders,
            "the pending migrations could not be fully rehearsed: %s at line %s hit the rehearsal's %s (%s, "
            "SQLSTATE %s: %s)%s; this says nothing against the SQL, the server was too busy to rehearse it "
            "without holding up its traffic" % (
                first["filename"], first.get("line"), limit, cause, first["sqlstate"], first.get("message"),
                "; not rehearsed after it: %s" % ", ".join(remaining) if remaining else ""),
            "nothing was changed; re-run at a quieter moment%s, or, after reviewing the pending SQL, "
            "skip the rehearsal with -e precheck_rehearse=false" % (
                " (or allow longer statements: -e precheck_rehearse_statement_timeout=2min)"
                if first["sqlstate"] == "57014" else "")), results
    if failed:
        first = failed[0]
        return check("rehearsal", False, observed, threshold, offenders,
                     "rehearsal: %s" % "; ".join(line for line in lines if "would fail" in line),
                     "fix %s at line %s (SQLSTATE %s), then re-run; nothing was changed" % (
                         first["filename"], first.get("line"), first.get("sqlstate"))), results
    return check("rehearsal", True, observed, threshold,
                 message="%d pending migration(s) rehearsed, all would apply%s" % (len(results), not_rehearsed)), results


# --------------------------------------------------------------------------- maintenance window

def _parse_hhmm(text):
    match = re.match(r"^\s*(\d{1,2}):(\d{2})\s*$", str(text or ""))
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        raise ValueError("%r is not HH:MM" % (text,))
    return datetime.time(int(match.group(1)), int(match.group(2)))


def _parse_days(days):
    out = []
    for d in days or DAYS:
        if isinstance(d, int) and 0 <= d <= 6:
            out.append(d)
            continue
        key = str(d).strip().lower()[:3]
        if key not in DAYS:
            raise ValueError("%r is not a day (mon..sun)" % (d,))
        out.append(DAYS.index(key))
    return sorted(set(out))


def window_contains(window, now_utc):
    """(inside, local_now_text) for a window {start, end, days, timezone}; a window may span midnight."""
    from zoneinfo import ZoneInfo
    tz = ZoneInfo(window.get("timezone") or "UTC")
    start, end = _parse_hhmm(window.get("start")), _parse_hhmm(window.get("end"))
    days = _parse_days(window.get("days"))
    local = now_utc.astimezone(tz)
    t = local.time().replace(second=0, microsecond=0)
    if start <= end:
        inside = local.weekday() in days and start <= t < end
    else:  # spans midnight: the day named is the day the window opens
        inside = (local.weekday() in days and t >= start) or ((local.weekday() - 1) % 7 in days and t < end)
    return inside, local.strftime("%a %H:%M %Z")


def check_maintenance(environment, ack, window, now_utc=None):
    now_utc = now_utc or datetime.datetime.now(datetime.timezone.utc)
    threshold = {"required_for": "production", "ack": "maintenance_window_ack=true",
                 "window": window or None}
    if (environment or "").lower() != "production":
        return check("maintenance_window", True, {"environment": environment, "required": False}, threshold,
                     message="no maintenance window required for environment %s" % environment)
    if ack:
        return check("maintenance_window", True, {"environment": environment, "acknowledged": True}, threshold,
                     message="maintenance window acknowledged (maintenance_window_ack=true)")
    if window:
        try:
            inside, local = window_contains(window, now_utc)
        except Exception as exc:  # noqa: BLE001 - a bad window is a refusal, with the reason
            return check("maintenance_window", False, {"environment": environment, "window_error": str(exc)},
                         threshold, message="precheck_maintenance_window is invalid: %s" % exc,
                         next_step="fix precheck_maintenance_window ({start: 'HH:MM', end: 'HH:MM', days: [mon], "
                                   "timezone: UTC})")
        return check("maintenance_window", inside, {"environment": environment, "now": local, "inside": inside},
                     threshold, message="now (%s) is %s the configured window %s-%s %s" % (
                         local, "inside" if inside else "outside", window.get("start"), window.get("end"),
                         ",".join(str(d) for d in (window.get("days") or DAYS))),
                     next_step=None if inside else "run inside the window, or acknowledge one explicitly with "
                                                   "-e maintenance_window_ack=true")
    return check("maintenance_window", False, {"environment": environment, "acknowledged": False}, threshold,
                 message="production requires an acknowledged maintenance window",
                 next_step="announce the window to the team, then re-run with -e maintenance_window_ack=true "
                           "(or configure precheck_maintenance_window)")


# --------------------------------------------------------------------------- remedy

def terminate_idle(cur, minutes, check_mode):
    action = "false" if check_mode else "pg_terminate_backend(pid)"
    cur.execute(
        "SELECT pid, usename, application_name, extract(epoch FROM now() - state_change)::int,"
        " left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), %s), " + action +
        " FROM pg_stat_activity WHERE state = 'idle' AND backend_type = 'client backend'"
        " AND datname = current_database() AND pid <> pg_backend_pid() AND application_name <> %s"
        " AND state_change < now() - make_interval(secs => %s) ORDER BY 4 DESC",
        (QUERY_CHARS, APPLICATION_NAME, float(minutes) * 60))
    out = []
    for pid, user, app, age, query, ended in cur.fetchall():
        out.append({"pid": pid, "user": user, "application_name": app, "idle_s": age, "last_query": query,
                    "terminated": bool(ended)})
    return out


# --------------------------------------------------------------------------- the run

def _server_facts(cur):
    cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
                " pg_database_size(current_database()), to_regclass('migrations.events') IS NOT NULL")
    version, num, size, records = cur.fetchone()
    return {"server_version": version, "server_major": num // 10000, "db_size": size, "records": records}


def run_precheck(params, check_mode=False, now_utc=None):
    """Every check, in one call. Returns the result dict; result['failed'] tells whether the run must stop."""
    p = _defaults(params)
    started = time.time()
    url = p["database_url"]
    target = describe_target(url)
    checks = []
    facts = None
    conn = None
    state = {"applied": [], "pending": [], "pending_items": [], "tables": set(), "problem": False}
    terminated = []
    changed = False
    backup_state = None
    rehearsal_results = None
    try:
        parse_url(url)
        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
    except LedgerError as exc:
        checks.append(check("server_version", False, {"reachable": False}, {"accepted_majors": p["accepted_versions"]},
                            message=exc.msg, next_step="check database_url, the network and the server's "
                                                       "pg_hba.conf, then re-run"))
    try:
        if conn is not None:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '30s'")
                facts = _server_facts(cur)
                checks.append(check_version(facts, p["accepted_versions"]))
                checks.append(check_backup_privilege(cur))
                checks.extend(check_roles(cur, p["app_role"], p["required_roles"]))
                checks.extend(check_replication(cur, p["max_replication_lag"]))
        else:
            for name in ("backup_privilege", "app_role_login", "required_roles", "replication_lag",
                         "replication_slots"):
                checks.append(not_run(name, "no connection to %s" % target))

        # The backup directory: space for the dump (database size with a margin), writable, private.
        if p.get("backup_dir"):
            needed = int(facts["db_size"] * p["backup_space_margin"]) if facts else None
            backup_state = check_backup_dir(p["backup_dir"], needed)
            observed = {"path": backup_state["path"], "exists": backup_state["exists"], "mode": backup_state["mode"],
                        "writable": backup_state["writable"], "free_bytes": backup_state["free_bytes"]}
            if backup_state["would_create"]:
                observed["would_create"] = "%s (mode 0700)" % backup_state["path"]
            checks.append(check(
                "backup_dir", not backup_state["problems"], observed,
                {"free_bytes_at_least": needed, "margin": p["backup_space_margin"], "mode": "no access for others",
                 "writable": True}, [{"problem": x} for x in backup_state["problems"]],
                "; ".join(backup_state["problems"]) if backup_state["problems"] else
                "%s %s, %s free, needs %s" % (backup_state["path"],
                                              "will be created 0700" if backup_state["would_create"] else
                                              "mode %s writable" % backup_state["mode"],
                                              human_bytes(backup_state["free_bytes"]), human_bytes(needed)),
                None if not backup_state["problems"] else "fix the backup directory as said, or set backup_dir"))
        else:
            checks.append(check("backup_dir", True, "not configured", None,
                                message="no backup_dir given: not checked"))

        checks.append(check_maintenance(p["environment"], p["maintenance_window_ack"], p.get("maintenance_window"),
                                        now_utc))

        if conn is not None:
            mig_checks, state = check_migrations(conn, p)
            checks.extend(mig_checks)
        elif p.get("migrations_dir"):
            checks.append(not_run("migration_set", "no connection"))

        # The opt-in remedy runs only when every check so far passed, so a run refused for
        # another reason ends nobody's session; the session checks below then see its effect.
        static_failed = [c["name"] for c in checks if c["passed"] is False]
        if conn is not None and p.get("terminate_idle_minutes"):
            if static_failed:
                checks.append(check("terminate_idle", None, "not run: other checks failed (%s)" % ", ".join(
                    static_failed), {"idle_minutes": p["terminate_idle_minutes"]},
                    message="idle sessions not terminated because the run is refused anyway"))
            else:
                with conn.cursor() as cur:
                    terminated = terminate_idle(cur, p["terminate_idle_minutes"], check_mode)
                changed = changed or any(t["terminated"] for t in terminated)
                verb = "would terminate" if check_mode else "terminated"
                checks.append(check("terminate_idle", True, {verb: len(terminated)},
                                    {"idle_minutes": p["terminate_idle_minutes"]}, terminated,
                                    "%s %d idle session(s) older than %g min%s" % (
                                        verb, len(terminated), p["terminate_idle_minutes"],
                                        ": " + ", ".join("pid %s (%s, %s)" % (t["pid"], t["user"],
                                                                              t["application_name"])
                                                         for t in terminated) if terminated else "")))

        if conn is not None:
            with conn.cursor() as cur:
                checks.append(check_connections(cur, p.get("max_connections")))
                session_checks = [check_long_running(cur, p["long_tx_seconds"]),
                                  check_idle_in_transaction(cur, p["long_tx_seconds"]),
                                  check_lock_waits(cur, p["lock_schemas"],
                                                   sorted(set(p.get("lock_tables") or []) | state["tables"]))]
            checks.extend(session_checks)
            # Last: the rehearsal takes the migrations' locks (then rolls back), so it runs only
            # when no session would make it wait.
            rehearsal, rehearsal_results = check_rehearsal(
                conn, url, p, state, [c["name"] for c in session_checks if c["passed"] is False])
            if rehearsal is not None:
                checks.append(rehearsal)
        else:
            for name in ("connections", "long_running_queries", "idle_in_transaction", "lock_waits"):
                checks.append(not_run(name, "no connection"))
        checks.append(check_pgbouncer(p.get("pgbouncer_admin_url"), p["pgbouncer_max_waiting"],
                                      p.get("pgbouncer_max_server_connections"), p["connect_timeout"]))
    except psycopg2.Error as exc:
        err = pg_error(exc)
        checks.append(check("precheck_query", False, {"sqlstate": err["sqlstate"]}, None,
                            message="a precheck query failed on %s: %s" % (target, format_pg_error(err)),
                            next_step="grant the migration role pg_monitor (or run it as a superuser), then re-run"))
    finally:
        if conn is not None:
            conn.close()

    failed = [c for c in checks if c["passed"] is False]
    backup_dir_created = False
    if not failed and not check_mode and backup_state and backup_state["would_create"] and state["pending"]:
        try:
            backup_dir_created = ensure_backup_dir(backup_state["path"])
            changed = changed or backup_dir_created
        except OSError as exc:
            failed.append(check("backup_dir", False, {"path": backup_state["path"]}, None,
                                message="cannot create %s: %s" % (backup_state["path"], exc)))
            checks.append(failed[-1])

    applied = state["applied"]
    result = {
        "changed": changed, "failed": bool(failed), "target": target, "checks": redact_obj(checks),
        "failed_checks": [c["name"] for c in failed], "passed_checks": [c["name"] for c in checks if c["passed"]],
        "pending": state["pending"], "applied": applied, "schema_version": applied[-1] if applied else None,
        "terminated": terminated, "backup_dir_created": backup_dir_created,
        "server_version": facts["server_version"] if facts else None,
        "database_size_bytes": facts["db_size"] if facts else None,
        "environment": p["environment"], "duration_s": round(time.time() - started, 3), "check_mode": check_mode,
    }
    rerun = p.get("rerun_command") or "ansible-playbook playbooks/precheck.yml -l <target>"
    if failed:
        lines = ["precheck refused %s: %d of %d checks failed (nothing was changed)" % (
            target, len(failed), len([c for c in checks if c["passed"] is not None]))]
        for c in failed:
            lines.append("- %s: %s" % (c["name"], c["message"]))
            if c.get("next"):
                lines.append("  next: %s" % c["next"])
        lines.append("Then re-run: %s" % rerun)
        result["msg"] = redact("\n".join(lines))
    else:
        result["msg"] = "precheck passed on %s: %d checks, %d pending migration(s)%s%s" % (
            target, len([c for c in checks if c["passed"]]), len(state["pending"]),
            " (%s)" % ", ".join(state["pending"]) if state["pending"] else "",
            "; created %s 0700" % backup_state["path"] if backup_dir_created else "")

    # The event: real runs only; never create the records schema for a refused run.
    if not check_mode and facts is not None and (facts["records"] or (state["pending"] and not failed)):
        if rehearsal_results:
            would_fail = [r for r in rehearsal_results if r["status"] == "would_fail"]
            incomplete = bool(would_fail) and would_fail[0].get("sqlstate") in NOT_REHEARSED_SQLSTATES
            log_event_autonomous(url, p.get("run_id") or "adhoc", "rehearse",
                                 "incomplete" if incomplete else "failed" if would_fail else "ok",
                                 version=(would_fail[0] if would_fail else rehearsal_results[-1])["version"],
                                 detail={"stage": "precheck", "results": [
                                     dict((k, r.get(k)) for k in ("version", "filename", "status", "sqlstate",
                                                                  "line", "message")) for r in rehearsal_results]})
        result["event_logged"] = log_event_autonomous(
            url, p.get("run_id") or "adhoc", "precheck", "refused" if failed else "passed",
            duration_ms=int(result["duration_s"] * 1000),
            detail={"failed_checks": result["failed_checks"], "pending": state["pending"],
                    "terminated": [t["pid"] for t in terminated if t["terminated"]],
                    "checks": [{"name": c["name"], "passed": c["passed"], "message": c["message"]} for c in checks]})
    else:
        result["event_logged"] = False
    return result


SPEC_OPTIONS = {}


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises.

    main() passes it to exit_json/fail_json; the action plugin (plugins/action/ledger_precheck.py)
    calls it in-process when the target runs on the controller's own Python.
    """
    try:
        result = run_precheck(params, check_mode=check_mode)
    except LedgerError as exc:
        return dict(redact_obj(exc.fields), failed=True, msg=redact(exc.msg))
    except Exception as exc:  # noqa: BLE001 - an operator gets a message, never a traceback
        return dict(failed=True,
                    msg="ledger_precheck failed unexpectedly on %s: %s: %s (a bug: please report it with this "
                        "message)" % (describe_target(params["database_url"]), type(exc).__name__,
                                      redact(str(exc))))
    if not result.pop("failed"):
        return result
    return dict(result, failed=True)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True, **SPEC_OPTIONS)
    result = result_of(module.params, check_mode=module.check_mode)
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
