# -*- coding: utf-8 -*-
"""The Markdown form of a run report (plugins/callback/ledger_report.py writes it beside the JSON)."""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest import human_age

# The outcome groups of a report's summary, in the order they are shown.
SUMMARY_KEYS = ("done", "failed", "interrupted", "untouched")


def _cell(value):
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _impact_lines(impact):
    """The impact profile of a target: per file, each statement's locks on pre-existing tables."""
    if not impact or not impact.get("files"):
        return []
    out = ["", "Impact profile (policy %s, large above %s rows):" % (impact.get("policy"), impact.get("rows_threshold")),
           "", "| file | line | relation | lock | rewrite | rows | ms | observed |", "|---|---|---|---|---|---|---|---|"]
    for f in impact["files"]:
        for st in f.get("statements") or []:
            for rel in st.get("relations") or []:
                out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    _cell(f.get("filename")), st.get("line"), _cell(rel.get("relation")), rel.get("lock") or "-",
                    "yes" if rel.get("rewrite") else "no", rel.get("rows"), "-" if st.get("ms") is None else st["ms"],
                    "yes" if st.get("observed", True) else "no (documented)"))
    for i in impact.get("impacts") or []:
        out.append("- **impact**%s: `%s` line %s: %s%s on `%s` (%s rows)" % (
            " (allowed by -- ledger:allow-lock)" if i.get("allowed") else "", i.get("file"), i.get("line"),
            i.get("lock") or "", " + rewrite" if i.get("rewrite") else "", i.get("table"), i.get("rows")))
    for n in impact.get("squawk") or []:
        where = ("`%s` line %s: " % (n["file"], n["line"])) if n.get("file") else ""
        out.append("- squawk vs profile: %s" % _cell(where + n.get("note", "")))
    for d in impact.get("size_differences") or []:
        out.append("- size differs from staging >10x: `%s` %s rows here, %s on staging" % (
            d["table"], d["rows"], d["staging_rows"]))
    out.append("")
    return out


def _pitr_leftover_lines(leftovers):
    """Each directory a point-in-time recovery left beside the data directory, with what to do about it."""
    out = []
    for d in leftovers or []:
        size = human_bytes(d["size_bytes"]) if d.get("size_bytes") is not None else d.get("size_note")
        out.append("- Left by a point-in-time recovery (%s, %s, %s old): `%s`: %s%s" % (
            d.get("kind"), size, human_age(d.get("age_s") or 0), d.get("path"), _cell(d.get("advice")),
            ("; `%s`" % d["remove_command"]) if d.get("remove_command") else ""))
    return out


def render_markdown(report):
    lines = []
    mode = " (--check rehearsal: nothing was changed)" if report.get("check_mode") else ""
    lines.append("# Migration run %s%s" % (report["run_id"], mode))
    lines.append("")
    lines.append("- Playbook: `%s`" % (report.get("playbook") or "?"))
    lines.append("- Limit: `%s`" % (report.get("limit") or ""))
    lines.append("- Status: **%s**" % report["status"])
    lines.append("- Started %s, ended %s (%.1f s)" % (report["started_at"], report["ended_at"], report["duration_s"]))
    lines.append("")
    lines.append("## Summary")
    lines.append("")
    lines.append("| outcome | targets |")
    lines.append("|---|---|")
    for key in SUMMARY_KEYS:
        hosts = report["summary"][key]
        lines.append("| %s (%d) | %s |" % (key, len(hosts), _cell(", ".join(hosts))))
    lines.append("")
    if report.get("batches"):
        lines.append("Batches (canary first): " + "; ".join(
            "%d: %s" % (i + 1, ", ".join(b)) for i, b in enumerate(report["batches"])))
        lines.append("")
    for host, tgt in report["targets"].items():
        lines.append("## %s: %s" % (host, tgt["outcome"]))
        lines.append("")
        if tgt.get("target"):
            lines.append("- Target: `%s`%s" % (tgt["target"], (" (%s)" % tgt["environment"]) if tgt.get("environment") else ""))
        if tgt.get("batch"):
            lines.append("- Batch: %s" % tgt["batch"])
        if tgt["outcome"] == "untouched":
            lines.append("- Not reached: no stage ran on this target (the run stopped before its batch).")
            lines.append("")
            continue
        if tgt.get("stages"):
            lines.append("")
            lines.append("| stage | outcome | duration (s) |")
            lines.append("|---|---|---|")
            for name, st in tgt["stages"].items():
                lines.append("| %s | %s | %.2f |" % (name, st["outcome"], st["duration_s"]))
            lines.append("")
        if tgt.get("migrations_applied"):
            lines.append("- Migrations applied: %s" % ", ".join(str(v) for v in tgt["migrations_applied"]))
        elif "migrate" in tgt.get("stages", {}):
            lines.append("- Migrations applied: none")
        if report.get("check_mode") and tgt.get("migrations_pending"):
            lines.append("- Would apply: %s" % ", ".join(str(v) for v in tgt["migrations_pending"]))
        backup = tgt.get("backup")
        if backup and backup.get("file") and backup.get("sha256"):
            lines.append("- Backup: `%s` (sha256 `%s`)" % (backup["file"], backup["sha256"]))
        elif backup and backup.get("restore_point") and backup.get("verified"):
            lines.append("- Backup: restore point `%s` at %s on pgBackRest backup %s (manifest `%s`)"
                         % (backup["restore_point"], backup.get("lsn"), backup.get("backup_label"), backup["file"]))
        elif backup and backup.get("file"):
            lines.append("- Backup: %s `%s`" % ("would write" if report.get("check_mode") else "not completed:",
                                                backup["file"]))
        elif backup:
            lines.append("- Backup: none taken (%s)" % backup.get("outcome"))
        verify = tgt.get("verify")
        if verify:
            checks = verify.get("checks") or []
            lines.append("- Verify: %s (%d of %d checks passed)" % (verify["outcome"], verify.get("passed", 0),
                                                                    len(checks)))
            for c in checks:
                if c.get("passed") is False:
                    lines.append("  - failed check `%s`%s: %s" % (
                        c.get("name"), (" on %s" % c["relation"]) if c.get("relation") else "",
                        _cell(c.get("observed") or c.get("message") or c.get("msg"))))
        lines.extend(_pitr_leftover_lines(tgt.get("pitr_leftovers")))
        lines.extend(_impact_lines(tgt.get("impact")))
        failure = tgt.get("failure")
        if failure:
            where = ""
            if failure.get("file"):
                where = " in `%s`%s" % (failure["file"], (" line %s" % failure["line"]) if failure.get("line") else "")
            sqlstate = (" SQLSTATE %s" % failure["sqlstate"]) if failure.get("sqlstate") else ""
            lines.append("- **Failure** (%s, task \"%s\")%s%s:" % (failure.get("stage") or "-", failure.get("task"), sqlstate, where))
            lines.append("")
            lines.append("  ```")
            for line in str(failure.get("msg") or "").splitlines() or [""]:
                lines.append("  " + line)
            lines.append("  ```")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
