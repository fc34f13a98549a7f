"""The operator's screen: the line of each stage result, and a failure re-raised by a rescue said once."""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_screen_lines import new_part, stage_line


def test_each_stage_says_what_it_did_in_one_line():
    assert stage_line("ledger_precheck", {"checks": [{}] * 17, "failed_checks": []}) == "precheck: 17/17 checks passed"
    assert stage_line("ledger_precheck", {"checks": [{}] * 17, "failed_checks": ["stage_privileges"]}) == \
        "precheck: 16/17 checks passed; failed: stage_privileges"
    assert stage_line("ledger_backup", {"backup_file": "/b/x.dump", "size_bytes": 7168, "sha256": "ab" * 32,
                                        "verify_method": "full read"}) == \
        "backup: /b/x.dump (7.0 kB, sha256 abababababab…), verified: full read"
    applied = [{"version": v, "execution_ms": 20} for v in ("0008", "0009", "0010", "0011")]
    assert stage_line("ledger_migrate", {"applied": applied, "target": "t", "version_after": "0011"}) == \
        "migrate: applied 0008-0011 to t in 80 ms (now at 0011)"
    assert stage_line("ledger_migrate", {"applied": [], "target": "t", "version_after": "0011"}) == \
        "migrate: nothing pending on t (at 0011)"
    assert stage_line("ledger_verify", {"checks": [{}] * 139, "passed": 139, "target": "t",
                                        "versions": ["0008", "0009", "0010", "0011", "0012"],
                                        "unknown_versions": ["0012"]}) == \
        "verify: 139/139 checks passed on t (versions 0008-0012); not verified: 0012 (newer than verify's checks)"
    assert stage_line("ledger_verify", {"verification_failed": True}) is None  # its fail task speaks


def test_a_rehearsal_and_a_revert_plan_name_what_they_did_not_rehearse():
    rehearsal = [{"version": "0008", "filename": "0008_a.sql", "status": "would_apply"},
                 {"version": "0009", "filename": "0009_b.sql", "status": "would_apply",
                  "skipped_statements": [{"line": 3, "reason": "VACUUM cannot run in a transaction"}],
                  "notes": ["line 5: rehearsed without CONCURRENTLY"]}]
    assert stage_line("ledger_migrate", {"rehearsal": rehearsal, "target": "t"}, check_mode=True) == (
        "migrate (rehearsal, rolled back): 0008-0009 would apply on t; not rehearsed: 0009_b.sql line 3"
        " (VACUUM cannot run in a transaction); 0009_b.sql line 5: rehearsed without CONCURRENTLY")
    # A lock impact: --check shows its verdict and table under the line.
    impact_lines = ["lock impact: migrate_lock_policy=warn: 1 lock impact(s) ...", "  0009_b.sql impact:"]
    assert stage_line("ledger_migrate", {"rehearsal": rehearsal[:1], "target": "t", "impact_lines": impact_lines},
                      check_mode=True) == "\n".join(
        ["migrate (rehearsal, rolled back): 0008 would apply on t; every statement rehearsed"] + impact_lines)
    plan = {"rehearsal": [{"file": "0011_x.down.sql", "skipped": [{"line": 4, "reason": "CONCURRENTLY"}]}]}
    assert stage_line("ledger_rollback", plan) == "rollback: not rehearsed: 0011_x.down.sql line 4 (CONCURRENTLY)"
    assert stage_line("ledger_rollback", {"rehearsal": [{"file": "f", "skipped": []}]}) is None


def test_a_failure_re_raised_by_a_rescue_adds_only_its_own_lines():
    first = "migration of 0010 failed ...\n  next: fix it"
    assert new_part(first, []) == first
    assert new_part(first + "\n", [first]) == ""
    assert new_part(first + "\non_failure=rollback: reverted 0009", [first]) == "on_failure=rollback: reverted 0009"
