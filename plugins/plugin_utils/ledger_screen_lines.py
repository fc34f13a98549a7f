# -*- coding: utf-8 -*-
"""What the operator's screen (plugins/callback/ledger_screen.py) says for a stage result or a failure.

Plain functions of a module's result, so that the wording is tested without a playbook.
"""

from __future__ import annotations


def _versions(items):
    """`0008-0011` for consecutive versions, `0008, 0010` otherwise."""
    vs = [str(i.get("version") if isinstance(i, dict) else i) for i in items or []]
    if not vs:
        return ""
    if len(vs) > 1 and all(v.isdigit() for v in vs) and \
            [int(v) for v in vs] == list(range(int(vs[0]), int(vs[0]) + len(vs))):
        return "%s-%s" % (vs[0], vs[-1])
    return ", ".join(vs)


def _size(n):
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "%d B" % n  # pragma: no cover - unreachable


def _not_rehearsed(rehearsal):
    """`0012_x.sql line 3 (CREATE INDEX CONCURRENTLY ...)` for each statement or file the rehearsal did not run."""
    out = []
    for r in rehearsal or []:
        if r.get("status") == "not_rehearsed":
            out.append("%s (%s)" % (r.get("filename"), r.get("reason") or "not rehearsed"))
        for s in r.get("skipped_statements") or []:
            out.append("%s line %s (%s)" % (r.get("filename"), s.get("line"), s.get("reason") or "not rehearsed"))
        # A statement rehearsed in another form (CONCURRENTLY without it) was not rehearsed as written.
        for note in r.get("notes") or []:
            out.append("%s %s" % (r.get("filename"), note))
    return out


def precheck_line(res):
    checks = res.get("checks") or []
    failed = res.get("failed_checks") or []
    names = [c if isinstance(c, str) else c.get("name") or c.get("id") for c in failed]
    if failed:
        return "precheck: %d/%d checks passed; failed: %s" % (len(checks) - len(failed), len(checks), ", ".join(names))
    return "precheck: %d/%d checks passed" % (len(checks), len(checks))


def backup_line(res, check_mode=False):
    if not res.get("backup_file"):
        return None
    if check_mode:
        return "backup: not taken under --check (would write %s)" % res["backup_file"]
    sha = (res.get("sha256") or "")[:12]
    return "backup: %s (%s, sha256 %s…), verified: %s" % (
        res["backup_file"], _size(res.get("size_bytes")), sha, res.get("verify_method") or "no")


def migrate_line(res, check_mode):
    if res.get("lines") is not None:  # action status: its debug task shows the lines
        return None
    target = res.get("target") or ""
    if check_mode or res.get("rehearsal") is not None and not res.get("applied"):
        rehearsal = res.get("rehearsal") or []
        if not rehearsal:
            return "migrate: nothing pending on %s (at %s)" % (target, res.get("version_after") or "none")
        ok = [r for r in rehearsal if r.get("status") == "would_apply"]
        line = "migrate (rehearsal, rolled back): %s would apply on %s" % (_versions(ok) or "nothing", target)
        skipped = _not_rehearsed(rehearsal)
        line += "; not rehearsed: %s" % "; ".join(skipped) if skipped else "; every statement rehearsed"
        # A lock impact (or squawk's disagreement) is what --check is for: its table, not only the report's.
        return "\n".join([line] + list(res.get("impact_lines") or []))
    if res.get("reverted") is not None and res.get("applied") is None:
        return None
    applied = res.get("applied") or []
    if not applied:
        return "migrate: nothing pending on %s (at %s)" % (target, res.get("version_after") or "none")
    ms = sum(int(a.get("execution_ms") or 0) for a in applied if isinstance(a, dict))
    now_at = res.get("version_after") or applied[-1].get("version")
    return "migrate: applied %s to %s in %d ms (now at %s)" % (_versions(applied), target, ms, now_at)


def verify_line(res):
    checks = res.get("checks") or []
    passed = res.get("passed", len(checks))
    line = "verify: %d/%d checks passed on %s" % (passed, len(checks), res.get("target") or "")
    versions = res.get("versions") or []
    if versions:
        line += " (versions %s)" % _versions(versions)
    unknown = res.get("unknown_versions") or []
    if unknown:
        line += "; not verified: %s (newer than verify's checks)" % ", ".join(unknown)
    return line


def stage_line(action, res, check_mode=False):
    """The one line a successful stage result prints at verbosity 0, or None (its debug task speaks)."""
    if action == "ledger_precheck":
        return precheck_line(res)
    if action == "ledger_backup":
        return backup_line(res, check_mode)
    if action == "ledger_migrate":
        return migrate_line(res, check_mode)
    if action == "ledger_verify":
        return None if res.get("verification_failed") else verify_line(res)
    if action == "ledger_rollback":
        return rollback_line(res)
    return None


def rollback_line(res):
    """The down-script statements a revert plan's rehearsal did not run (its debug task shows the plan)."""
    skipped = []
    for r in res.get("rehearsal") or []:
        for x in r.get("skipped") or r.get("skipped_statements") or []:
            if isinstance(x, dict):
                skipped.append("%s line %s (%s)" % (r.get("file") or r.get("filename"), x.get("line"),
                                                    x.get("reason") or "not rehearsed"))
            else:
                skipped.append("%s: %s" % (r.get("file") or r.get("filename"), x))
    if not skipped:
        return None
    return "rollback: not rehearsed: %s" % "; ".join(skipped)


def failure_text(res, task_name):
    """The failure's own message (the modules word it completely), else what Ansible said."""
    msg = res.get("msg")
    if not isinstance(msg, str) or not msg.strip():
        msg = res.get("stderr") or res.get("reason") or "task '%s' failed" % task_name
    return msg.strip()


def new_part(text, shown):
    """What of `text` has not been shown yet: a rescue that re-raises a message adds only its own lines."""
    rest = text
    for old in shown:
        if old and old in rest:
            rest = rest.replace(old, "", 1)
    rest = "\n".join(line for line in rest.split("\n") if line.strip())
    return rest.strip()
