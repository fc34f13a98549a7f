"""The room a point-in-time recovery's copy needs (ledger_pgbackrest_leftovers): databases + WAL + the rest of a data
directory, x the margin; a pg_wal this role may not measure is counted by the settings, and the message says so."""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import (
    REST_ALLOWANCE,
    estimate_copy,
    room_beside,
)

MIB = 1 << 20
SETTINGS = {"max_wal_size": 1024 * MIB, "min_wal_size": 80 * MIB, "wal_keep_size": 0, "wal_segment_size": 16 * MIB}


def test_the_wal_part_is_the_larger_of_pg_wal_now_and_the_settings_bound():
    small = estimate_copy(30 * MIB, SETTINGS, 48 * MIB)
    assert small["wal_bytes"] == 1024 * MIB + 32 * MIB == small["wal_settings_bytes"]
    assert small["total_bytes"] == 30 * MIB + 1056 * MIB + REST_ALLOWANCE
    # A pg_wal past the soft max_wal_size (a lagging archive): the copy serves that workload after the swap.
    big = estimate_copy(30 * MIB, SETTINGS, 5000 * MIB)
    assert big["wal_bytes"] == 5000 * MIB and big["total_bytes"] == 30 * MIB + 5000 * MIB + REST_ALLOWANCE
    assert "pg_wal now %s" % human_bytes(5000 * MIB) in big["wal_note"]
    # wal_keep_size above max_wal_size keeps that much, plus a segment.
    kept = estimate_copy(0, dict(SETTINGS, wal_keep_size=4096 * MIB), 0)
    assert kept["wal_bytes"] == 4096 * MIB + 32 * MIB


def test_without_pg_ls_waldir_the_settings_bound_counts_and_the_message_says_so():
    est = estimate_copy(30 * MIB, SETTINGS, None)
    assert est["pg_wal_bytes"] is None and est["wal_bytes"] == est["wal_settings_bytes"] == 1056 * MIB
    assert "pg_wal NOT measured" in est["wal_note"] and "pg_ls_waldir()" in est["wal_note"]
    assert "pg_monitor" in est["wal_note"]


def test_the_room_is_the_estimate_times_the_margin_with_every_part_in_its_text(tmp_path):
    est = estimate_copy(30 * MIB, SETTINGS, 48 * MIB)
    room = room_beside(str(tmp_path / "data"), est, 1.5)
    assert room["path"] == str(tmp_path) and room["free_bytes"] > 0
    assert room["needed_bytes"] == int(est["total_bytes"] * 1.5)
    for part in (human_bytes(room["needed_bytes"]), "databases %s" % human_bytes(30 * MIB), est["wal_note"],
                 "the rest of a data directory %s" % human_bytes(REST_ALLOWANCE), "the margin 1.5",
                 "%s free in %s" % (human_bytes(room["free_bytes"]), tmp_path)):
        assert part in room["text"], part
