"""Every file a backup writes is its own run's: run id in the name, the partial created exclusively."""

from __future__ import annotations

import threading

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import (
    backup_basename,
    reserve_backup_path,
    run_tag,
)

STAMP = "20261130T201516Z"


def test_the_run_id_is_in_the_name():
    assert run_tag("20261130T201516Z-48119d17") == "48119d17"
    assert run_tag(None) == "adhoc" and run_tag("a/b..c") == "abc"
    assert backup_basename("h-5432-db", None, STAMP, "20261130T201516Z-48119d17") == \
        "h-5432-db_base_20261130T201516Z_48119d17"


def test_two_runs_in_the_same_second_get_their_own_files(tmp_path):
    a = reserve_backup_path(str(tmp_path), "t", "0009", STAMP, "r-aaaa1111", ".dump")
    b = reserve_backup_path(str(tmp_path), "t", "0009", STAMP, "r-bbbb2222", ".dump")
    assert a[0] != b[0] and a[1] != b[1]
    assert (tmp_path / "t_0009_20261130T201516Z_aaaa1111.dump.partial-aaaa1111").is_file()


def test_the_same_run_id_twice_moves_on_to_the_next_name(tmp_path):
    first = reserve_backup_path(str(tmp_path), "t", "0009", STAMP, "r-same", ".dump")
    second = reserve_backup_path(str(tmp_path), "t", "0009", STAMP, "r-same", ".dump")
    assert second[0].endswith("t_0009_20261130T201516Z-2_same.dump") and first[0] != second[0]
    # A finished backup (the partial renamed) keeps its name from being reused as well.
    (tmp_path / "t_0009_20261130T201516Z-3_same.dump").write_text("")
    third = reserve_backup_path(str(tmp_path), "t", "0009", STAMP, "r-same", ".dump")
    assert third[0].endswith("-4_same.dump")
    d = reserve_backup_path(str(tmp_path), "t", "0009", STAMP, "r-same", ".dir", directory=True)
    assert (tmp_path / (d[0].rsplit("/", 1)[1] + ".partial-same")).is_dir()


def test_racing_reservations_never_share_a_file(tmp_path):
    """16 threads released together by a barrier, all with one stamp and one run id (the worst case)."""
    n = 16
    barrier = threading.Barrier(n)
    got = []
    lock = threading.Lock()

    def reserve():
        barrier.wait()
        path = reserve_backup_path(str(tmp_path), "t", None, STAMP, "r-race", ".dump")
        with lock:
            got.append(path)

    threads = [threading.Thread(target=reserve) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == n and len({p for p, _ in got}) == n and len({p for _, p in got}) == n
    assert len(list(tmp_path.glob("*.partial-*"))) == n
