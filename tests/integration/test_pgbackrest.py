"""backup_method=pgbackrest on a real PostgreSQL 15 that archives to a real pgBackRest repository.

One cluster for the whole module (started by scripts/pgcluster.py --archive pgbackrest, as
`SANDBOX_ARCHIVE=pgbackrest make sandbox` does): the refusals first (archiving broken, backup
too old, restore point not archived, data loss without consent), then a restore point and a
point-in-time recovery, a recovery whose copy fails its check (the target stays as it was),
and the rollback playbook's PITR. The tests run in file order and share the cluster.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import archiving_cluster
from ledgertest import RUNBOOK_SET
from pghelpers import history, load_module, q
from test_engine_locks import Bg, wait_for

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import pitr_directories

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

pytestmark = pytest.mark.skipif(shutil.which("pgbackrest") is None and os.geteuid() != 0,
                                reason="pgbackrest is not installed (make pytest installs it as root)")


@pytest.fixture(scope="module")
def archived():
    """A PostgreSQL 15 archiving to a pgBackRest repository (stanza `pytest`), at 0011 with records."""
    with archiving_cluster("ledger-pgbackrest-", "pytest") as (base, state):
        yield _seeded(base, state)


def _seeded(base, state):
    """The archiving cluster's environment, its records seeded at 0011 and a probe table of 100 rows."""
    url = state["url"]
    mod = load_module("ledger_pgbackrest")
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_common as common
    import psycopg2
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        common.ensure_records(cur)
        for version in ("0008", "0009", "0010", "0011"):
            cur.execute("INSERT INTO migrations.history (version, name, checksum, applied_by, execution_ms, run_id)"
                        " VALUES (%s, 'm', repeat('a', 64), 'pytest', 1, 'seed')", (version,))
        cur.execute("CREATE TABLE public.pitr_probe (id int PRIMARY KEY)")
        cur.execute("INSERT INTO public.pitr_probe SELECT generate_series(1, 100)")
    conn.close()
    return {"url": url, "state": state, "base": base, "mod": mod, "backups": str(base / "backups"),
            "config": state["pgbackrest"]["config"], "home": Path(state["home"])}


def params(env, action, **kw):
    p = dict(action=action, database_url=env["url"], stanza="pytest", config=env["config"], os_user=env["state"]["os_user"],
             max_age="7d", check_timeout=120, backup_type="none", backup_dir=env["backups"], backup_file=None,
             row_counts=True, lock_timeout="10s", archive_timeout=60, allow_data_loss=False, recovery_timeout=300,
             space_margin=1.2, pg_bindir=None, progress_file=None, progress_interval=10, run_id="pytest",
             host_label="pitrdb", rerun_command="re-run", binary="pgbackrest", block_incremental="auto",
             lock_wait=90.0, lock_ttl=60.0, connect_timeout=10, leftovers_size_timeout=10.0)
    p.update(kw)
    return p


def set_archive_command(env, command):
    q(env["url"], "ALTER SYSTEM SET archive_command = %s", (command,))
    q(env["url"], "SELECT pg_reload_conf()")
    time.sleep(0.5)


def wait_archiver_failure(env, timeout=60):
    q(env["url"], "CREATE TEMP TABLE wal_filler AS SELECT 1")  # some WAL (catalog rows), no user rows
    q(env["url"], "SELECT pg_switch_wal()")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if q(env["url"], "SELECT failed_count > 0 AND last_failed_time > coalesce(last_archived_time, '-infinity')"
                         " FROM pg_stat_archiver")[0][0]:
            return
        time.sleep(0.3)
    raise AssertionError("the archiver did not fail")


def test_precheck_passes_on_a_healthy_archive(archived):
    res = archived["mod"].result_of(params(archived, "check"))
    assert not res.get("failed"), res["msg"]
    assert [c["name"] for c in res["checks"]] == ["archive_mode", "archiver", "pgbackrest_check", "backup_age",
                                                  "pitr_leftovers"]
    assert res["pitr_leftovers"] == [] and "nothing left by point-in-time recoveries beside" in res["msg"]
    assert all(c["ok"] for c in res["checks"])


def test_precheck_refuses_a_backup_older_than_max_age(archived):
    # The fixture's full backup is seconds old; once (CI, load about 4) the check found it at most 1 s old, so
    # the refusal is asserted once the newest backup is older than that by the module's own clock.
    deadline = time.time() + 30
    while True:
        res = archived["mod"].result_of(params(archived, "check", max_age="1"))
        age = [c for c in res["checks"] if c["name"] == "backup_age"][0]
        if age["observed"]["age_s"] > 1 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert res.get("failed") and res["failed_checks"] == ["backup_age"], age
    assert "at most 1" in age["message"]
    assert "--type=diff backup" in age["next"] and "--stanza=pytest" in age["next"] and archived["config"] in age["next"]


def test_precheck_refuses_a_bad_max_age(archived):
    res = archived["mod"].result_of(params(archived, "check", max_age="a week"))
    assert res["failed"] and "not an age" in res["msg"]


def test_broken_archiving_refuses_the_precheck_and_the_restore_point(archived):
    """archive_command fails: the precheck says so (pg_stat_archiver and pgbackrest check) and the
    backup stage's restore point is refused as not archived, with a failed event and no manifest."""
    good = q(archived["url"], "SHOW archive_command")[0][0]
    set_archive_command(archived, "false")
    try:
        wait_archiver_failure(archived)
        res = archived["mod"].result_of(params(archived, "check", check_timeout=10))
        assert res["failed"]
        assert "archiver" in res["failed_checks"] and "pgbackrest_check" in res["failed_checks"]
        archiver = [c for c in res["checks"] if c["name"] == "archiver"][0]
        assert "archiving fails" in archiver["message"] and "check" in archiver["next"]
        assert "next: " in res["msg"] and "re-run" in res["msg"]

        res = archived["mod"].result_of(params(archived, "backup", archive_timeout=5, run_id="broken"))
        assert res["failed"], res
        assert "not archived" in res["msg"] or "archiving failed" in res["msg"]
        assert "no safety net" in res["msg"] and "Nothing was migrated" in res["msg"]
        assert not glob.glob(os.path.join(archived["backups"], "*.pitr.json"))
        assert q(archived["url"], "SELECT outcome, detail->>'restore_point' FROM migrations.events"
                                  " WHERE run_id = 'broken' AND action = 'backup'") == [("failed", "ledger-broken")]
    finally:
        set_archive_command(archived, good)
    deadline = time.time() + 60
    while q(archived["url"], "SELECT last_failed_time > coalesce(last_archived_time, '-infinity')"
                             " FROM pg_stat_archiver")[0][0]:
        assert time.time() < deadline, "archiving did not recover"
        q(archived["url"], "SELECT pg_switch_wal()")
        time.sleep(0.5)


def test_restore_point_with_an_incremental_backup(archived):
    res = archived["mod"].result_of(params(archived, "backup", backup_type="incr", run_id="run1"))
    assert not res.get("failed"), res["msg"]
    assert res["restore_point"] == "ledger-run1" and res["backup_label"].endswith("I")
    manifest = json.loads(Path(res["backup_file"]).read_text())
    assert res["backup_file"].endswith(".pitr.json") and oct(os.stat(res["backup_file"]).st_mode & 0o777) == "0o600"
    for key in ("method", "stanza", "backup_label", "restore_point", "restore_point_lsn", "timeline",
                "system_identifier", "applied", "row_counts", "wal_file"):
        assert manifest[key] not in (None, ""), key
    assert manifest["method"] == "pgbackrest" and manifest["applied"] == ["0008", "0009", "0010", "0011"]
    assert manifest["row_counts"]["public.pitr_probe"] == 100
    assert q(archived["url"], "SELECT detail->>'restore_point', detail->>'lsn' FROM migrations.events"
                              " WHERE run_id = 'run1' AND action = 'backup' AND outcome = 'ok'") == \
        [("ledger-run1", res["lsn"])]
    archived["manifest"] = res["backup_file"]


def test_check_mode_says_what_it_would_do_and_changes_nothing(archived):
    """--check: the backup stage and the recovery report, write no manifest, no event, no directory."""
    before = sorted(glob.glob(os.path.join(archived["backups"], "*.pitr.json")))
    events = q(archived["url"], "SELECT count(*) FROM migrations.events")[0][0]
    res = archived["mod"].result_of(params(archived, "backup", run_id="checkmode"), check_mode=True)
    assert not res.get("failed") and res["changed"] and res["msg"].startswith("would take a none backup")
    res = archived["mod"].result_of(params(archived, "restore", backup_file=before[-1]), check_mode=True)
    assert not res.get("failed") and res["msg"].startswith("would refuse without rollback_allow_data_loss=true")
    res = archived["mod"].result_of(params(archived, "restore", backup_file=before[-1], allow_data_loss=True),
                                    check_mode=True)
    assert not res.get("failed") and res["msg"].startswith("would recover (consented)")
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    assert not glob.glob(data_dir + ".pitr_*")
    assert sorted(glob.glob(os.path.join(archived["backups"], "*.pitr.json"))) == before
    assert q(archived["url"], "SELECT count(*) FROM migrations.events")[0][0] == events


def test_recovery_without_consent_is_refused_and_counts_the_loss(archived):
    q(archived["url"], "INSERT INTO public.pitr_probe SELECT generate_series(1001, 1050)")
    q(archived["url"], "DELETE FROM migrations.history WHERE version = '0011'")
    res = archived["mod"].result_of(params(archived, "restore", backup_file=archived["manifest"]))
    assert res["failed"]
    assert res["msg"].startswith("refused: point-in-time recovery")
    assert "rollback_allow_data_loss=true" in res["msg"] and "Nothing was changed" in res["msg"]
    assert res["data_at_risk"]["transaction_ids"] >= 2 and res["data_at_risk"]["wal_bytes"] > 0
    assert res["data_at_risk"]["versions_reverted_since"] == ["0011"]
    assert q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0] == 150


def test_a_copy_that_fails_its_check_leaves_the_target_as_it_was(archived, tmp_path):
    manifest = json.loads(Path(archived["manifest"]).read_text())
    manifest["row_counts"]["public.pitr_probe"] = 99  # the copy will hold 100
    bad = tmp_path / "bad.pitr.json"
    bad.write_text(json.dumps(manifest))
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    res = archived["mod"].result_of(params(archived, "restore", backup_file=str(bad), allow_data_loss=True,
                                           run_id="badcopy"))
    assert res["failed"] and "does not match the manifest" in res["msg"] and "was not replaced" in res["msg"]
    assert q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0] == 150
    assert history(archived["url"]) == ["0008", "0009", "0010"]
    assert not glob.glob(data_dir + ".pitr_*") and not glob.glob(data_dir + ".pre_pitr_*")
    assert q(archived["url"], "SELECT outcome FROM migrations.events WHERE run_id = 'badcopy'") == [("failed",)]


def test_recovery_with_consent_rewinds_to_the_restore_point(archived):
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    res = archived["mod"].result_of(params(archived, "restore", backup_file=archived["manifest"],
                                           allow_data_loss=True, run_id="pitr1"))
    assert not res.get("failed"), res["msg"]
    assert q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0] == 100
    assert history(archived["url"]) == ["0008", "0009", "0010", "0011"]
    assert res["check"]["row_counts_differ"] == {} and res["check"]["history_ok"]
    assert os.path.isdir(res["previous_data_directory"]) and res["previous_data_directory"].startswith(data_dir)
    archived["pre_pitr"] = res["previous_data_directory"]
    events = q(archived["url"], "SELECT action, outcome, detail->>'restore_point' FROM migrations.events"
                                " WHERE run_id = 'pitr1'")
    assert events == [("restore", "ok", "ledger-run1")]
    # The recovered cluster archives again (a new timeline), so the next run's precheck passes.
    res = archived["mod"].result_of(params(archived, "check"))
    assert not res.get("failed"), res["msg"]


def test_the_precheck_lists_what_recoveries_left_beside_the_data_directory(archived):
    """The real `pre_pitr` of the recovery above and the copy of a recovery killed two hours ago (its directory, as
    a killed run leaves it): both listed with kind, size, age and the command that removes each, as a warning.
    Copies no recovery uses that leave too little room for the next recovery's copy (here: a margin no disk
    meets) refuse, with the numbers. A recovery running now (the test holds the cluster's PITR lock) makes its own
    copy "in use, do not remove", and only its own. The sizes are measured within a time limit."""
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import utc_stamp
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import disk_usage
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_lease import ClusterLock
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    kept = archived["pre_pitr"]
    killed = data_dir + ".pitr_" + utc_stamp(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2))
    made = [killed]
    try:
        os.makedirs(os.path.join(killed, "base"))
        Path(killed, "base", "1").write_bytes(os.urandom(1 << 20))
        res = archived["mod"].result_of(params(archived, "check"))
        assert not res.get("failed"), res["msg"]
        check = [c for c in res["checks"] if c["name"] == "pitr_leftovers"][0]
        assert check["ok"] and check["observed"]["pitr_lock"]["state"] == "free"
        found = {d["path"]: d for d in res["pitr_leftovers"]}
        assert found[killed]["kind"] == "interrupted" and found[killed]["in_use"] is False
        assert 7200 <= found[killed]["age_s"] < 7200 + 600 and found[killed]["size_bytes"] >= 1 << 20
        assert found[killed]["advice"] == "safe to remove: no recovery runs now"
        assert found[killed]["remove_command"] == \
            "rm -rf %s   # as root on the database host, no recovery uses it" % killed
        assert found[kept]["kind"] == "kept" and found[kept]["size_bytes"] > 10 << 20  # a whole cluster
        # The estimate holds what a real copy holds: the kept directory of the recovery above (its pg_wal included,
        # which the databases' sizes leave out), and the recovered data directory serving now.
        estimate = check["observed"]["estimate"]
        assert estimate["pg_wal_bytes"] is not None  # a superuser may call pg_ls_waldir()
        assert estimate["total_bytes"] >= found[kept]["size_bytes"] > estimate["databases_bytes"]
        live, note = disk_usage(data_dir, time.monotonic() + 60)
        assert note is None and estimate["total_bytes"] >= live
        assert check["observed"]["needed_bytes"] == int(estimate["total_bytes"] * 1.2)
        assert found[kept]["remove_command"] == \
            "rm -rf %s   # as root on the database host, once nothing in it is wanted" % kept
        assert "the copy of a point-in-time recovery that was interrupted" in res["msg"]
        assert "the cluster as it was before a finished point-in-time recovery" in res["msg"]
        assert found[killed]["remove_command"] in res["msg"] and found[kept]["remove_command"] in res["msg"]

        res = archived["mod"].result_of(params(archived, "check", space_margin=1e9))
        assert res["failed"] and res["failed_checks"] == ["pitr_leftovers"], res["msg"]
        check = [c for c in res["checks"] if c["name"] == "pitr_leftovers"][0]
        seen = check["observed"]
        assert seen["needed_bytes"] == int(seen["estimate"]["total_bytes"] * 1e9)
        assert seen["free_bytes"] < seen["needed_bytes"]
        assert "TOO LITTLE ROOM for the next point-in-time recovery" in check["message"]
        for figure in room_figures(seen):
            assert figure in check["message"], figure
        assert "FAILED pitr_leftovers" in res["msg"] and found[killed]["remove_command"] in res["msg"]

        res = archived["mod"].result_of(params(archived, "check", leftovers_size_timeout=0))
        assert {d["size_note"] for d in res["pitr_leftovers"]} == {"size not measured (still counting when the time "
                                                                   "limit was up)"}
        assert "size not measured" in res["msg"]

        lock = ClusterLock(data_dir, "pitr-now", "pitrdb", wait=1).acquire()
        try:
            time.sleep(1.1)  # a real PITR stamps its copy after it took the lock
            running = data_dir + ".pitr_" + utc_stamp()
            made.append(running)
            os.mkdir(running)
            res = archived["mod"].result_of(params(archived, "check"))
        finally:
            lock.release()
        assert not res.get("failed"), res["msg"]
        found = {d["path"]: d for d in res["pitr_leftovers"]}
        assert found[running]["in_use"] is True and found[running]["remove_command"] is None
        assert found[running]["advice"].startswith("in use, do not remove: the point-in-time recovery running now "
                                                   "(run pitr-now by ")
        assert "rm -rf %s " % running not in res["msg"]
        assert found[killed]["in_use"] is False and found[killed]["remove_command"]
        assert found[killed]["advice"].startswith("safe to remove: the recovery running now (run pitr-now by ")
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def room_figures(room):
    """What the room's message must show so the numbers add up: free, needed and each part with the margin."""
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_backup_utils import human_bytes
    estimate = room["estimate"]
    return (human_bytes(room["free_bytes"]), human_bytes(room["needed_bytes"]),
            "databases %s" % human_bytes(estimate["databases_bytes"]), estimate["wal_note"],
            "the rest of a data directory %s" % human_bytes(estimate["rest_bytes"]), "the margin %s" % room["margin"])


def test_a_recovery_without_room_for_its_copy_refuses_with_the_parts(archived):
    """The same rule as the precheck's: a margin no disk meets refuses before anything is restored."""
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    before = sorted(glob.glob(data_dir + ".*"))
    rows = q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0]
    res = archived["mod"].result_of(params(archived, "restore", backup_file=archived["manifest"], allow_data_loss=True,
                                           space_margin=1e9, run_id="noroom"))
    assert res["failed"] and res["msg"].startswith("not enough room beside %s for the recovered copy" % data_dir)
    assert "Nothing was changed" in res["msg"]
    assert res["space"]["needed_bytes"] == int(res["space"]["estimate"]["total_bytes"] * 1e9)
    for figure in room_figures(res["space"]):
        assert figure in res["msg"], figure
    assert sorted(glob.glob(data_dir + ".*")) == before
    assert q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0] == rows


def test_a_role_that_may_not_list_pg_wal_counts_the_wal_settings_and_says_so(archived):
    """pg_ls_waldir() needs superuser or pg_monitor: without it the WAL part is the settings' bound, never less."""
    import psycopg2
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_pgbackrest_leftovers import copy_estimate
    q(archived["url"], "CREATE ROLE pitr_nomonitor LOGIN PASSWORD 'pitr-nomonitor'")
    try:
        seen = {}
        for monitor in (False, True):
            if monitor:
                q(archived["url"], "GRANT pg_monitor TO pitr_nomonitor")
            conn = psycopg2.connect(archived["url"], user="pitr_nomonitor", password="pitr-nomonitor")
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    seen[monitor] = copy_estimate(cur)
            finally:
                conn.close()
        assert seen[False]["pg_wal_bytes"] is None and "pg_wal NOT measured" in seen[False]["wal_note"]
        assert seen[False]["wal_bytes"] == seen[False]["wal_settings_bytes"] >= 1 << 20
        assert seen[True]["pg_wal_bytes"] > 0 and "pg_wal now" in seen[True]["wal_note"]
        assert seen[True]["wal_bytes"] == max(seen[True]["pg_wal_bytes"], seen[True]["wal_settings_bytes"])
        assert seen[True]["wal_settings_bytes"] == seen[False]["wal_settings_bytes"]
    finally:
        q(archived["url"], "DROP ROLE pitr_nomonitor")


def test_rollback_playbook_recovers_with_consent(archived, tmp_path):
    """migrate-like state → restore point through backup.yml → rows → rollback.yml PITR."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"pitrdb": {
        "database_url": archived["url"], "backup_dir": archived["backups"], "backup_method": "pgbackrest",
        "pgbackrest_stanza": "pytest", "pgbackrest_config": archived["config"],
        "pgbackrest_os_user": archived["state"]["os_user"], "pgbackrest_backup_type": "none"}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_NOCOLOR="1", PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))

    def run(playbook, *args):
        return subprocess.run([str(PLAYBOOK), "-i", str(inventory), str(ROOT / "playbooks" / playbook), "-l", "pitrdb",
                               *args], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)

    # A full backup takes seconds here: with a 1 s interval its progress lines show.
    out = run("backup.yml", "-e", "pgbackrest_backup_type=full", "-e", "backup_progress_interval=1")
    assert out.returncode == 0, out.stdout[-3000:]
    text = " ".join(out.stdout.split())  # the YAML callback wraps long messages
    assert "restore point ledger-" in text and "on full backup" in text
    assert "] pgbackrest: pgbackrest full backup" in text
    report = Path(text.split("Run report: ")[1].split(" ")[0]).read_text()
    assert "- Backup: restore point `ledger-" in report and ".pitr.json" in report
    q(archived["url"], "INSERT INTO public.pitr_probe SELECT generate_series(2001, 2010)")
    out = run("rollback.yml", "-e", "rollback_mode=restore")
    assert out.returncode != 0 and "rollback_allow_data_loss=true" in out.stdout
    assert q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0] == 110
    out = run("rollback.yml", "-e", "rollback_mode=restore", "-e", "rollback_allow_data_loss=true")
    assert out.returncode == 0, out.stdout[-3000:]
    assert "recovered postgres@" in out.stdout
    assert q(archived["url"], "SELECT count(*) FROM public.pitr_probe")[0][0] == 100
    assert history(archived["url"]) == ["0008", "0009", "0010", "0011"]


def test_on_failure_rollback_recovers_the_run_restore_point_with_consent(archived, tmp_path):
    """A run applies 0008-0011 to a fresh database, 0012 fails, 0011 has no down script: with
    on_failure=rollback and rollback_allow_data_loss=true, the run's own restore point is recovered."""
    base = archived["url"].rsplit("/", 1)[0]
    q(base + "/postgres", "CREATE DATABASE onfail")
    url = base + "/onfail"
    kept = glob.glob(q(base + "/postgres", "SHOW data_directory")[0][0] + ".pre_pitr_*")  # of the recoveries above
    assert kept
    migrations = tmp_path / "migrations"
    shutil.copytree(RUNBOOK_SET, migrations)  # the runbook's 0008-0011, whatever else files/migrations holds
    for down in migrations.glob("0011_*.down.sql"):
        down.unlink()
    (migrations / "0012_fails_on_purpose.sql").write_text("-- fails at apply time, on purpose\nSELECT 1 / 0;\n")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"onfail": {
        "database_url": url, "backup_dir": str(tmp_path / "backups"), "backup_method": "pgbackrest",
        "pgbackrest_stanza": "pytest", "pgbackrest_config": archived["config"],
        "pgbackrest_os_user": archived["state"]["os_user"], "pgbackrest_backup_type": "none"}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_NOCOLOR="1", PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run([str(PLAYBOOK), "-i", str(inventory), str(ROOT / "playbooks" / "migrate.yml"), "-l", "onfail",
                          "-e", "migrations_dir=%s" % migrations, "-e", "on_failure=rollback",
                          "-e", "rollback_allow_data_loss=true", "-e", "precheck_rehearse=false"],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    text = " ".join(out.stdout.split())
    assert out.returncode != 0, text[-3000:]
    assert "0012_fails_on_purpose.sql line 2: SQLSTATE 22012" in text
    # The precheck listed what the recoveries before this run left, and the run report records it.
    assert "pitr_leftovers: " in text and "the cluster as it was before a finished point-in-time recovery" in text
    report = json.loads(Path(text.split("Run report: ")[1].split(" ")[0][:-len(".md")] + ".json").read_text())
    listed = report["targets"]["onfail"]["pitr_leftovers"]
    assert set(kept) <= {d["path"] for d in listed if d["kind"] == "kept"}, listed
    # The precheck stage keeps the checklist's checks and the pgBackRest checks, one after the other.
    names = [c["name"] for c in report["targets"]["onfail"]["stages"]["precheck"]["details"]["checks"]]
    assert {"pitr_leftovers", "server_version", "archive_mode"} <= set(names) and len(names) == len(set(names)), names
    assert "on_failure=rollback: recovered postgres@" in text, text[-3000:]
    assert history(url) == []
    assert q(url, "SELECT action, outcome FROM migrations.events WHERE action = 'restore'") == [("restore", "ok")]



# --------------------------------------------------------------------------- leases (issue 15)
# A PITR takes the cluster's PITR lock and the target's run lease (ledger_pgbackrest_lease.py).
# The races are held deterministically by a lock on the object the held run touches next.

@pytest.fixture(scope="module")
def leasedb(archived):
    """A second database of the archiving cluster, with a restore point (manifest) of its own."""
    base = archived["url"].rsplit("/", 1)[0]
    q(base + "/postgres", "CREATE DATABASE leasedb")
    url = base + "/leasedb"
    q(url, "CREATE TABLE public.gate (i int)")
    res = archived["mod"].result_of(params(archived, "backup", database_url=url, run_id="lease-rp"))
    assert not res.get("failed"), res["msg"]
    return {"url": url, "manifest": res["backup_file"]}


def lease_row(url):
    return q(url, "SELECT run_id, holder FROM migrations.lock")


def waiting_on_lock(url, table):
    return q(url, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                  " WHERE NOT l.granted AND c.relname = %s", (table,))[0][0] > 0


def test_a_pitr_waits_for_a_running_migrate_or_refuses_naming_it(archived, leasedb, tmp_path):
    """A real migrate holds the target's lease (held mid-migration by a lock on `gate`): a PITR with a
    short lock wait refuses naming it and changes nothing; one with a longer wait waits, then recovers."""
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
    import psycopg2
    url, data_dir = leasedb["url"], q(archived["url"], "SHOW data_directory")[0][0]
    mset = tmp_path / "m"
    mset.mkdir()
    (mset / "0001_hold.sql").write_text("CREATE TABLE public.hold_probe (i int);\nSELECT count(*) FROM public.gate;\n")
    gate = psycopg2.connect(url)
    with gate.cursor() as cur:
        cur.execute("LOCK TABLE public.gate IN ACCESS EXCLUSIVE MODE")
    migrate = Bg(engine.apply, url, engine.load_migration_set(str(mset)), run_id="migrate-b", lock_wait=30,
                 lock_timeout="120s", advice=PlaybookAdvice("pitrdb"))
    migrate.start()
    try:
        wait_for(lambda: lease_row(url) and lease_row(url)[0][0] == "migrate-b" and waiting_on_lock(url, "gate"),
                 timeout=60)
        res = archived["mod"].result_of(params(archived, "restore", database_url=url, backup_file=leasedb["manifest"],
                                               allow_data_loss=True, run_id="pitr-refused", lock_wait=1.0))
        assert res["failed"] and "another migration run holds" in res["msg"] and "run migrate-b" in res["msg"], res
        assert not glob.glob(data_dir + ".pitr_*")
        assert lease_row(url)[0][0] == "migrate-b"
        waiting = Bg(archived["mod"].result_of, params(archived, "restore", database_url=url,
                                                       backup_file=leasedb["manifest"], allow_data_loss=True,
                                                       run_id="pitr-waits", lock_wait=120.0))
        waiting.start()
        wait_for(lambda: q(url, "SELECT 1 FROM migrations.events WHERE run_id = 'pitr-waits' AND action = 'lock_wait'"
                                " AND outcome = 'waiting'"), timeout=60)
    finally:
        gate.rollback()  # the migration goes on, commits and frees the lease
        gate.close()
    migrate.join(120)
    assert migrate.error is None and migrate.result["applied"], migrate.error
    waiting.join(600)
    assert waiting.error is None and not waiting.result.get("failed"), waiting.result or waiting.error
    assert waiting.result["lease_waited_s"] > 0 and waiting.result["lease_kept_through_swap"] is True
    # Rewound to the restore point: the migration that ran meanwhile is undone, and the lease is free.
    assert q(url, "SELECT to_regclass('public.hold_probe')")[0][0] is None
    assert history(url) == [] and lease_row(url) == []


def test_while_a_pitr_runs_a_second_pitr_and_a_dump_restore_refuse_naming_it(archived, leasedb, tmp_path):
    """A PITR is held after taking its locks (it counts the loss under the lease, reading
    migrations.history, which the test locks): a PITR of another database of the same cluster and a
    dump restore of the same target refuse naming it; released, it recovers and frees the lease."""
    import psycopg2
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
    url = leasedb["url"]
    hold = psycopg2.connect(url)
    with hold.cursor() as cur:
        cur.execute("LOCK TABLE migrations.history IN ACCESS EXCLUSIVE MODE")
    first = Bg(archived["mod"].result_of, params(archived, "restore", database_url=url, backup_file=leasedb["manifest"],
                                                 allow_data_loss=True, run_id="pitr-a"))
    first.start()
    try:
        wait_for(lambda: lease_row(url) and lease_row(url)[0][0] == "pitr-a" and waiting_on_lock(url, "history"),
                 timeout=60)
        assert lease_row(url)[0][1].startswith("restore by ")
        other_db = archived["mod"].result_of(params(archived, "restore", backup_file=archived["manifest"],
                                                    allow_data_loss=True, run_id="pitr-b", lock_wait=1.0))
        assert other_db["failed"], other_db
        assert "another point-in-time recovery of this cluster is running: run pitr-a" in other_db["msg"]
        assert "Nothing was changed" in other_db["msg"]
        same_db = archived["mod"].result_of(params(archived, "restore", database_url=url,
                                                   backup_file=leasedb["manifest"], allow_data_loss=True,
                                                   run_id="pitr-c", lock_wait=1.0))
        assert same_db["failed"] and "run pitr-a" in same_db["msg"], same_db
        rollback = load_module("ledger_rollback")
        try:
            dump = rollback.run({"database_url": url, "mode": "restore", "backup_dir": str(tmp_path), "run_id": "dump-d",
                                 "host_label": "pitrdb", "lock_wait": 1.0})
            msg = dump.get("msg", "")
        except LedgerError as exc:
            msg = exc.msg
        assert "another migration run holds" in msg and "run pitr-a" in msg, msg
        assert lease_row(url)[0][0] == "pitr-a"
    finally:
        hold.rollback()
        hold.close()
    first.join(600)
    assert first.error is None and not first.result.get("failed"), first.result or first.error
    assert first.result["lease_kept_through_swap"] is True and lease_row(url) == []
    assert q(url, "SELECT outcome FROM migrations.events WHERE run_id = 'pitr-a' AND action = 'restore'") == [("ok",)]


# --------------------------------------------------------------------------- stopping the playbook (issue 17.6)

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_playbook_stops_the_pitr_before_the_swap(archived, leasedb, tmp_path, sig):
    """`ansible-playbook rollback.yml` (PITR) in its own process group, stopped as a group (SIGKILL, SIGTERM,
    Ctrl-C's SIGINT) while the PITR, its copy recovered, checked and stopped, waits to park its lease right
    before the swap (the test holds the lease row FOR UPDATE): Ansible's worker (its own session) and the
    module die with it; the target is unchanged, accepts connections, and no copy server is left running;
    the copy's directory is left."""
    import psycopg2
    url = leasedb["url"]
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    q(url, "CREATE TABLE IF NOT EXISTS public.kill_probe (i int)")
    q(url, "INSERT INTO public.kill_probe VALUES (1)")
    probes = q(url, "SELECT count(*) FROM public.kill_probe")[0][0]
    kept = glob.glob(data_dir + ".pre_pitr_*")  # of the recoveries before this one
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"pitrdb": {
        "database_url": url, "backup_dir": archived["backups"], "backup_method": "pgbackrest",
        "pgbackrest_stanza": "pytest", "pgbackrest_config": archived["config"],
        "pgbackrest_os_user": archived["state"]["os_user"], "pgbackrest_backup_type": "none"}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / ".ansible"),
               ANSIBLE_NOCOLOR="1", PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))
    # A long TTL: no heartbeat renews the row while the test holds it, so the one waiter is the park.
    proc = subprocess.Popen([str(PLAYBOOK), "-i", str(inventory), str(ROOT / "playbooks" / "rollback.yml"),
                             "-l", "pitrdb", "-e", "rollback_mode=restore", "-e", "rollback_allow_data_loss=true",
                             "-e", "backup_file=%s" % leasedb["manifest"], "-e", "rollback_lock_ttl=600",
                             "-e", "rollback_run_id=pitr-killed"],
                            cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    hold = psycopg2.connect(url)
    try:
        kill_before_the_swap(proc, hold, url, data_dir, sig)
        # Not swapped: the same data directory, the row written after the restore point, connections accepted.
        assert q(archived["url"], "SHOW data_directory")[0][0] == data_dir
        assert q(url, "SELECT count(*) FROM public.kill_probe")[0][0] == probes
        assert sorted(glob.glob(data_dir + ".pre_pitr_*")) == sorted(kept)
        # No server of the copy runs (its postmaster was this run's child); its directory is left, as documented.
        # This cluster's copy only: another xdist worker may be recovering a cluster of its own meanwhile.
        assert [pid for pid in os.listdir("/proc") if pid.isdigit() and data_dir + ".pitr_" in _cmdline(pid)] == []
        assert len(glob.glob(data_dir + ".pitr_*")) == 1
        # The dead run's lease row stays until it expires; the next run's precheck names it.
        assert lease_row(url)[0][0] == "pitr-killed"
        # The next precheck lists the copy the killed run left, by the name the run gave it: an interrupted
        # recovery's, not in use (the kernel released the dead run's PITR lock), removed with its socket directory.
        res = archived["mod"].result_of(params(archived, "check"))
        copy = glob.glob(data_dir + ".pitr_*")[0]
        listed = [d for d in res["pitr_leftovers"] if d["path"] == copy]
        assert listed and listed[0]["kind"] == "interrupted" and listed[0]["in_use"] is False, res["msg"]
        [sock] = listed[0]["sockets"]  # its own: named with this cluster's mark
        assert os.path.basename(sock).startswith(pitr_directories(data_dir, copy.rsplit(".pitr_", 1)[1])["socket_prefix"])
        assert listed[0]["remove_command"] == \
            "rm -rf %s %s   # as root on the database host, no recovery uses it" % (copy, listed[0]["sockets"][0])
    finally:
        clean_up_killed(proc, hold, url, data_dir)


def clean_up_killed(proc, hold, url, data_dir):
    """After a killed recovery's test: the playbook's group, the lease row it left, the copies (and their socket
    directories) that killed recoveries of this cluster left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    hold.close()
    q(url, "DELETE FROM migrations.lock WHERE run_id = 'pitr-killed'")
    for copy in glob.glob(data_dir + ".pitr_*"):
        shutil.rmtree(copy, ignore_errors=True)  # a recovery left running (a failed test) may remove it too
        stamp = copy.rsplit(".pitr_", 1)[1]
        prefix = pitr_directories(data_dir, stamp)["socket_prefix"]
        for sock in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(prefix) + "*")):
            shutil.rmtree(sock, ignore_errors=True)


def kill_before_the_swap(proc, hold, url, data_dir, sig, hosts=()):
    """Hold the PITR's lease row once its copy exists, wait for its park to wait on it, kill the playbook's
    group; every process of its tree, and of the trees below ``hosts`` (an sshd: the module's session on
    the database host), must be gone within 30 s."""
    from test_rollback_interrupted import alive, descendants
    try:
        wait_for(lambda: proc.poll() is not None or glob.glob(data_dir + ".pitr_*"), timeout=240)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        with hold.cursor() as cur:
            cur.execute("SELECT run_id FROM migrations.lock WHERE id = 1 FOR UPDATE")
            assert cur.fetchone() == ("pitr-killed",)
        wait_for(lambda: proc.poll() is not None or q(
            url, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                 " AND query LIKE 'UPDATE migrations.lock SET renewed_at%%'")[0][0], timeout=240)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        copies = glob.glob(data_dir + ".pitr_*")
        assert len(copies) == 1 and not os.path.exists(os.path.join(copies[0], "postmaster.pid"))
        tree = descendants(proc.pid)
        assert tree, "the playbook has no worker"
        for pid in hosts:
            assert descendants(pid), "no session on the database host"
            tree += descendants(pid)
        os.killpg(proc.pid, sig)
        proc.communicate(timeout=60)
        deadline = time.time() + 30
        while [p for p in tree if alive(p)]:
            assert time.time() < deadline, "left running: %s" % [(p, _cmdline(p[0])) for p in tree if alive(p)]
            time.sleep(0.05)
    finally:
        hold.rollback()


def test_a_pitr_whose_playbook_is_gone_at_the_swap_does_not_swap(archived, leasedb, monkeypatch):
    """The check right before the swap (after the death signal is disarmed for it): a playbook that died
    without killing the run (its death seen only there) leaves the target unchanged and running, the copy
    removed, a failed event and the lease freed. The death itself cannot be timed into those microseconds:
    parent_alive() answers False here."""
    from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_lifeline
    url = leasedb["url"]
    data_dir = q(archived["url"], "SHOW data_directory")[0][0]
    q(url, "CREATE TABLE IF NOT EXISTS public.kill_probe (i int)")
    before = q(url, "SELECT count(*) FROM public.kill_probe")[0][0]
    kept = sorted(glob.glob(data_dir + ".pre_pitr_*"))  # of the recoveries before this one
    monkeypatch.setattr(ledger_lifeline.Lifeline, "parent_alive", lambda self: False)
    res = archived["mod"].result_of(params(archived, "restore", database_url=url, backup_file=leasedb["manifest"],
                                           allow_data_loss=True, run_id="pitr-orphan"))
    assert res["failed"] and res["refused"] == "parent_gone", res
    assert "the playbook that started this recovery is gone" in res["msg"] and "was not replaced" in res["msg"]
    assert q(archived["url"], "SHOW data_directory")[0][0] == data_dir
    assert q(url, "SELECT count(*) FROM public.kill_probe")[0][0] == before
    assert not glob.glob(data_dir + ".pitr_*") and sorted(glob.glob(data_dir + ".pre_pitr_*")) == kept
    assert q(url, "SELECT outcome FROM migrations.events WHERE run_id = 'pitr-orphan' AND action = 'restore'") == \
        [("failed",)]
    assert lease_row(url) == []


def _cmdline(pid):
    try:
        return Path("/proc/%s/cmdline" % pid).read_bytes().decode(errors="replace")
    except OSError:
        return ""
