# -*- coding: utf-8 -*-
"""ledger_rollback's revert: the engine's revert with the data-loss guard as its before_down hook."""

from __future__ import annotations

import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, connect, describe_target,
)


from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_rollback_plan import (
    _check_data_loss_backup,
    _cmd,
    _defaults,
    _describe_risk,
    _engine,
    _plan,
    _target_identity,
)


GUARD_SQLSTATE = "LR001"
_GUARD_TAG = "$ledger_rollback_guard$"


def _qi(name):
    return '"%s"' % name.replace('"', '""')


def _ql(text):
    return "'%s'" % str(text).replace("'", "''")


def _leaves(cur, oid):
    """schema.name of the leaf partitions of a partitioned table."""
    cur.execute("SELECT n.nspname || '.' || c.relname FROM pg_partition_tree(%s::oid::regclass) t"
                " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE t.isleaf", (oid,))
    return [r[0] for r in cur.fetchall()]


def _guard_checks(url, steps, before, backup_counts, p):
    """{version: {"lock": [tables], "checks": [{table, column, rows_sql, allowed, what}]}} of the plan.

    Without a data-loss backup, nothing may be dropped: every table the version drops must be empty and every
    column it drops NULL. With one (rollback_allow_data_loss), a table may hold at most the rows the backup
    counted (its manifest's row_counts, taken in the dump's snapshot): more means rows written after it.
    """
    guards = {}
    conn = None
    try:
        for step in steps:
            lock = set()
            checks = []
            for oid in step["_gone"]:
                t = before[oid]
                lock.add((t["schema"], t["name"]))
                # A partitioned table's rows are its leaves' (dropped with it, and counted one by one).
                if t["kind"] != "r":
                    continue
                ident = "%s.%s" % (_qi(t["schema"]), _qi(t["name"]))
                allowed = 0 if backup_counts is None else int(backup_counts.get(t["table"], 0))
                checks.append({"what": t["table"], "sql": "SELECT count(*) FROM %s" % ident, "allowed": allowed,
                               "unit": "row"})
            for oid, col in step["_cols"]:
                t = before[oid]
                lock.add((t["schema"], t["name"]))
                ident = "%s.%s" % (_qi(t["schema"]), _qi(t["name"]))
                what = "column %s.%s" % (t["table"], col)
                if backup_counts is None:
                    checks.append({"what": what, "sql": "SELECT count(*) FROM %s WHERE %s IS NOT NULL"
                                   % (ident, _qi(col)), "allowed": 0, "unit": "non-NULL value"})
                    continue
                if t["kind"] == "r":
                    allowed = int(backup_counts.get(t["table"], 0))
                else:
                    if conn is None:
                        conn = connect(url, autocommit=True, connect_timeout=p["connect_timeout"])
                    with conn.cursor() as cur:
                        allowed = sum(int(backup_counts.get(leaf, 0)) for leaf in _leaves(cur, oid))
                checks.append({"what": what, "sql": "SELECT count(*) FROM %s" % ident, "allowed": allowed,
                               "unit": "row"})
            if lock:
                guards[step["version"]] = {"lock": sorted(lock), "checks": checks}
    finally:
        if conn is not None:
            conn.close()
    return guards


def _guard_sql(version, guard, backup):
    """One DO block: LOCK what the version drops (ACCESS EXCLUSIVE, under the engine's lock_timeout), re-count
    with row-level security off (a hidden row fails loudly instead of being missed), and RAISE GUARD_SQLSTATE when
    rows the plan did not allow are there. Run first in the version's revert transaction, it holds the locks until
    the down script has dropped the tables and the transaction commits: no row can slip in between."""
    since = "in the backup %s" % backup if backup else "allowed (the plan found none)"
    lines = [
        "DO %s" % _GUARD_TAG,
        "DECLARE",
        "  n bigint;",
        "  problems text[] := '{}';",
        "  rs text := current_setting('row_security');",
        "BEGIN",
        "  -- ledger_rollback: lock what the down script of %s drops, re-count, refuse rows the plan did not allow"
        % version,
        "  LOCK TABLE %s IN ACCESS EXCLUSIVE MODE;" % ", ".join("%s.%s" % (_qi(a), _qi(b)) for a, b in guard["lock"]),
        "  PERFORM set_config('row_security', 'off', true);",
        "  BEGIN",
    ]
    for c in guard["checks"]:
        lines += [
            "    %s INTO n;" % c["sql"],
            "    IF n > %d THEN" % c["allowed"],
            "      problems := problems || format('%%s: %%s %s%%s now, %%s %s', %s, n,"
            " CASE WHEN n = 1 THEN '' ELSE 's' END, %d);" % (c["unit"], since.replace("'", "''").replace("%", "%%"),
                                                             _ql(c["what"]), c["allowed"]),
            "    END IF;",
        ]
    lines += [
        "  EXCEPTION WHEN insufficient_privilege THEN",
        "    RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = 'cannot count the rows the down script of %s would drop:"
        " ' || SQLERRM, HINT = 'run the rollback as the tables'' owner, a superuser or a BYPASSRLS role';"
        % (GUARD_SQLSTATE, version),
        "  END;",
        "  PERFORM set_config('row_security', rs, true);",
        "  IF cardinality(problems) > 0 THEN",
        "    RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = array_to_string(problems, '; ');" % GUARD_SQLSTATE,
        "  END IF;",
        "END",
        _GUARD_TAG,
    ]
    return "\n".join(lines)


def _refusal_sql(version):
    """The 'down script' of a version the plan did not cover (applied after it): refuse, change nothing."""
    return ("DO %s BEGIN RAISE EXCEPTION USING ERRCODE = '%s', MESSAGE = '%s was applied after the plan and was "
            "not planned or counted'; END %s" % (_GUARD_TAG, GUARD_SQLSTATE, version, _GUARD_TAG))


def run_revert(params, check_mode=False):
    """The plan again (rows may have changed since the plan step), then the engine's revert, guarded."""
    p = _defaults(params)
    url = p["database_url"]
    target = describe_target(url)
    host = p.get("host_label")
    engine = _engine()
    migrations = engine.load_migration_set(p["migrations_dir"]) if p.get("migrations_dir") else None
    plan, steps, before = _plan(p, check_mode=check_mode, _migrations=migrations)
    plan["reverted"] = []
    if not plan["to_revert"]:
        return plan
    backup = None
    if plan["data_at_risk"] and not check_mode:
        backup = _check_data_loss_backup(p.get("data_loss_backup"), url, plan["applied"], host, p.get("run_id"),
                                         _target_identity(url, p))
    planned = [i["version"] for i in plan["to_revert"]]
    before_down = None
    if not check_mode:
        guards = _guard_checks(url, steps, before, backup.get("row_counts") if backup else None, p)
        guard_sql = dict((v, _guard_sql(v, g, p.get("data_loss_backup") if backup else None))
                         for v, g in guards.items())
        plan["guarded"] = sorted(guard_sql, reverse=True)

        def before_down(version):
            """The engine's hook: first in each version's revert transaction, the guard (or a refusal)."""
            if version not in planned:
                return _refusal_sql(version)
            return guard_sql.get(version)
    started = time.time()
    try:
        answer = engine.revert(url, migrations, plan["to_version"], run_id=p.get("run_id"), advice=PlaybookAdvice(host),
                               check=check_mode, lock_timeout=p.get("lock_timeout"),
                               statement_timeout=p.get("statement_timeout"), lock_retries=p.get("lock_retries"),
                               retry_backoff=p.get("retry_backoff"), lock_wait=p.get("lock_wait"),
                               lock_ttl=p.get("lock_ttl"), direct_url=p.get("direct_url"),
                               before_down=before_down)
    except LedgerError as exc:
        fields = dict(plan)
        fields["plan_msg"] = fields.pop("msg", None)
        fields.update(exc.fields)
        fields.pop("msg", None)
        if exc.fields.get("sqlstate") == GUARD_SQLSTATE:
            raise _guard_refusal(exc, fields, plan, target, host)
        fields.setdefault("next_command", _cmd(host, "-e rollback_mode=restore"))
        raise LedgerError(exc.msg, **fields)
    result = dict(plan)
    result.update(reverted=[d["version"] for d in answer.get("reverted") or []],
                  version_after=answer.get("version_after"), engine_rehearsal=answer.get("rehearsal"),
                  run_id=answer.get("run_id"), changed=bool(answer.get("changed")),
                  duration_s=round(time.time() - started, 3))
    if backup:
        result["data_loss_backup"] = p.get("data_loss_backup")
    versions_txt = ", ".join(i["version"] for i in plan["to_revert"])
    if check_mode:
        result["msg"] = ("would revert %s on %s, newest first, ending at %s (rehearsed in a rolled-back transaction; "
                         "nothing was changed)%s" % (
                             versions_txt, target, plan["to_version"],
                             "; rows that would be lost: %s" % _describe_risk(plan["data_at_risk"])
                             if plan["data_at_risk"] else ""))
    else:
        result["msg"] = "reverted %s on %s, now at %s%s" % (
            ", ".join(result["reverted"]) or "nothing", target, answer.get("version_after") or "base",
            "; rows dropped (kept in the verified backup %s): %s" % (
                p.get("data_loss_backup"), _describe_risk(plan["data_at_risk"])) if plan["data_at_risk"] else "")
    return result


def _guard_refusal(exc, fields, plan, target, host):
    """The operator's message when a revert's guard refused (rows the plan did not allow, or an unplanned version)."""
    version = exc.fields.get("version")
    reverted = list(exc.fields.get("reverted") or [])
    still = [i["version"] for i in plan["to_revert"] if i["version"] not in reverted]
    now_at = still[0] if still else plan["to_version"]
    message = exc.fields.get("message") or exc.msg
    unplanned = version not in [i["version"] for i in plan["to_revert"]]
    fields.update(refused="unplanned_version" if unplanned else "rows_since_plan", guard_message=message,
                  next_command=_cmd(host, "-e rollback_to=%s" % plan["to_version"]))
    done = "; reverted before it (committed): %s" % ", ".join(reverted) if reverted else ""
    if unplanned:
        return LedgerError(
            "stopped the revert on %s before %s: %s (another run applied it after the plan). Nothing of it was "
            "dropped%s. Re-run, so that the plan covers and counts it: %s" % (
                target, version, message, done, fields["next_command"]), **fields)
    return LedgerError(
        "stopped the revert of %s on %s before its down script ran: %s. These rows were written after the plan "
        "counted them; nothing of %s was dropped (its transaction was rolled back)%s, and %s is still applied. "
        "Stop the writers, then re-run: the plan counts again and refuses, or asks for rollback_allow_data_loss "
        "(with a new backup): %s" % (
            version, target, message, version, done, now_at, fields["next_command"]), **fields)


# =========================================================================== restore
