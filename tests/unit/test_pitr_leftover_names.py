"""What a point-in-time recovery leaves beside the data directory: the names it creates are the names the precheck
finds (one function for both), nothing else is taken for one, and a held PITR lock marks only its own run's copy
as in use. The cluster-level listing is tested on a real PITR in tests/integration/test_pgbackrest.py."""

from __future__ import annotations

import os
import tempfile
import time

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import utc_stamp
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_lease import ClusterLock
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import (
    find_directories,
    list_leftovers,
    pitr_directories,
)


def test_the_names_a_pitr_creates_are_the_names_found(tmp_path):
    data = tmp_path / "main"
    data.mkdir()
    stamp = utc_stamp()
    names = pitr_directories(str(data) + "/", stamp)
    for key in ("copy", "kept", "failed"):
        os.mkdir(names[key])
    # Not ours: another cluster's, a file, a stamp of another form, the lock file.
    for other in ("main2.pitr_" + stamp, "main.pitr_latest", "main.pre_pitr_" + stamp + ".old"):
        (tmp_path / other).mkdir()
    (tmp_path / ("main.pitr_20261201T000000Z")).write_text("a file")
    (tmp_path / "main.ledger-pitr.lock").write_text("")
    found = find_directories(str(data))
    assert [(d["path"], d["kind"]) for d in found] == sorted(
        [(names["copy"], "interrupted"), (names["failed"], "failed"), (names["kept"], "kept")])


def test_two_clusters_recovered_in_the_same_second_each_find_only_their_own_socket_directory(tmp_path):
    """The copy's socket directory lives in the shared temporary directory: the cluster's mark keeps a fleet's
    recoveries of two clusters on one host from advising the removal of each other's."""
    stamp = "20200101T000000Z"
    mine, other = str(tmp_path / "main"), str(tmp_path / "other")
    for data in (mine, other):
        os.mkdir(data)
        os.mkdir(pitr_directories(data, stamp)["copy"])
    socks = [tempfile.mkdtemp(prefix=pitr_directories(data, stamp)["socket_prefix"]) for data in (mine, other)]
    try:
        assert pitr_directories(mine, stamp)["socket_prefix"] != pitr_directories(other, stamp)["socket_prefix"]
        found, _state, _holder = list_leftovers(mine, size_timeout=10)
        assert [d["sockets"] for d in found] == [[socks[0]]]
        assert socks[1] not in found[0]["remove_command"]
    finally:
        for sock in socks:
            os.rmdir(sock)


def test_a_held_lock_marks_only_the_running_recoverys_copy_in_use(tmp_path):
    data = str(tmp_path / "main")
    os.mkdir(data)
    old = pitr_directories(data, "20200101T000000Z")  # of a recovery killed long ago
    os.mkdir(old["copy"])
    with open(os.path.join(old["copy"], "base"), "wb") as fh:
        fh.write(b"x" * 65536)
    found, state, _holder = list_leftovers(data, size_timeout=10)
    assert state == "free" and found[0]["in_use"] is False and found[0]["size_bytes"] >= 65536
    assert found[0]["remove_command"].startswith("rm -rf %s   # as root on the database host" % old["copy"])
    lock = ClusterLock(data, "pitr-now", "t", wait=1).acquire()
    try:
        time.sleep(1.1)  # the stamp's second comes after the lock's `since`, as in a real PITR
        now = pitr_directories(data, utc_stamp())
        os.mkdir(now["copy"])
        found, state, holder = list_leftovers(data, size_timeout=10)
    finally:
        lock.release()
    assert state == "held" and holder["run_id"] == "pitr-now"
    by_path = {d["path"]: d for d in found}
    assert by_path[old["copy"]]["in_use"] is False and by_path[old["copy"]]["remove_command"]
    assert by_path[now["copy"]]["in_use"] is True and by_path[now["copy"]]["remove_command"] is None
    assert by_path[now["copy"]]["advice"].startswith("in use, do not remove") and "pitr-now" in \
        by_path[now["copy"]]["advice"]


def test_the_size_is_bounded_in_time(tmp_path):
    data = str(tmp_path / "main")
    os.mkdir(data)
    kept = pitr_directories(data, "20200101T000000Z")["kept"]
    os.mkdir(kept)
    open(os.path.join(kept, "PG_VERSION"), "w").close()
    found, _state, _holder = list_leftovers(data, size_timeout=0)
    assert found[0]["size_bytes"] is None and found[0]["size_note"].startswith("size not measured")
