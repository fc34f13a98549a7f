# -*- coding: utf-8 -*-
"""ledger_precheck's checks of the server: version, roles, sessions, PgBouncer, replication, the maintenance window."""

from __future__ import annotations

import datetime
import re

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    APPLICATION_NAME, describe_target, format_pg_error, pg_error, redact,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None


QUERY_CHARS = 80
SESSION_COLUMNS = ("pid", "user", "application_name", "age_s", "query")
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


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
