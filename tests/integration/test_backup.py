"""The backup module and its shared helpers on a real PostgreSQL 15.

Driven through `run_backup(params, check_mode)` (what AnsibleModule calls) and the helpers of
plugins/module_utils/ledger_backup_utils.py that the rollback stage reuses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_backup_utils as bu
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from pghelpers import load_module
from pghelpers import q as sql



ROOT = Path(__file__).resolve().parents[2]


backup = load_module("ledger_backup", prefix="")


def run(url, backup_dir, check_mode=False, **params):
    full = {k: v.get("default") for k, v in backup.ARGUMENT_SPEC.items()}
    full.update(database_url=url, backup_dir=str(backup_dir), run_id="test-" + uuid.uuid4().hex[:6], **params)
    return backup.run_backup(full, check_mode=check_mode)


def backup_events(url):
    if not sql(url, "SELECT to_regclass('migrations.events') IS NOT NULL")[0][0]:
        return []
    return sql(url, "SELECT outcome, detail FROM migrations.events WHERE action = 'backup' ORDER BY id")


@pytest.fixture
def seeded_db(empty_db):
    """A database with a pre-existing table of 20,000 rows (enough data to corrupt meaningfully)."""
    sql(empty_db, "CREATE TABLE public.customers (id int PRIMARY KEY, name text NOT NULL, note text);"
                  "INSERT INTO public.customers SELECT g, 'customer ' || g, md5(g::text) || md5((g * 7)::text)"
                  " FROM generate_series(1, 20000) g;"
                  "CREATE SCHEMA app; CREATE TABLE app.settings (k text PRIMARY KEY, v text);"
                  "INSERT INTO app.settings VALUES ('a', '1'), ('b', '2');")
    return empty_db


def test_backup_is_verified_by_a_restore_and_rows_compare(seeded_db, pg_cluster, tmp_path):
    backups = tmp_path / "backups"
    result = run(seeded_db, backups, verify="restore")
    path = Path(result["backup_file"])
    assert result["changed"] and result["verified"]
    assert result["row_counts"] == {"app.settings": 2, "public.customers": 20000}
    assert result["restore_check"]["rows"] == 20002
    # Name: <target-slug>_<schema-version>_<UTC timestamp>_<run tag>.dump (no records: schema version "base").
    slug = bu.target_slug(seeded_db)
    tag = bu.run_tag(json.loads(Path(result["manifest"]).read_text())["run_id"])
    assert re.fullmatch(re.escape(slug) + r"_base_[0-9]{8}T[0-9]{6}Z_" + tag + r"\.dump", path.name), path.name
    # Modes: 0600 files in a 0700 directory; no partial file left.
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    assert sorted(p.name for p in backups.iterdir()) == [path.name, path.name + ".json"]
    for p in backups.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # The scratch database is gone.
    assert sql(seeded_db, "SELECT count(*) FROM pg_database WHERE datname LIKE 'ledger_verify_%'")[0][0] == 0

    manifest = json.loads(Path(result["manifest"]).read_text())
    for key in ("target", "server_version", "schema_version", "size_bytes", "sha256", "pg_dump_version", "format",
                "compress", "jobs", "started_at", "finished_at", "verified", "verify_method", "row_counts"):
        assert key in manifest, key
    assert manifest["verified"] is True and manifest["sha256"] == bu.sha256_path(str(path))[0]
    assert manifest["target"] == "postgres@127.0.0.1:%d/%s" % (pg_cluster.port, seeded_db.rsplit("/", 1)[1])

    # Restore it ourselves into a scratch database and compare the pre-existing table row by row.
    scratch = pg_cluster.create_db()
    try:
        res = subprocess.run([pg_cluster.bin("pg_restore"), "--exit-on-error", "-d", pg_cluster.url(scratch), str(path)],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr
        digest = "SELECT count(*), md5(string_agg(id || ':' || name || ':' || note, ',' ORDER BY id)) FROM public.customers"
        assert sql(pg_cluster.url(scratch), digest) == sql(seeded_db, digest)
    finally:
        pg_cluster.drop_db(scratch)

    outcome, detail = backup_events(seeded_db)[-1]
    assert outcome == "ok" and detail["sha256"] == result["sha256"] and detail["verified"] is True


def test_manifest_names_the_server_and_counts_rows_with_a_read_verification(seeded_db, tmp_path):
    """Without backup_verify=restore, the manifest still has exact counts (for the restore's check) and the
    server's system_identifier with the database name (what identifies the target under any hostname)."""
    result = run(seeded_db, tmp_path / "b")
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert "scratch database" not in manifest["verify_method"]
    assert manifest["row_counts"] == {"app.settings": 2, "public.customers": 20000}
    assert manifest["row_counts_method"] == "count(*) in the dump's snapshot"
    sysid, dbname = sql(seeded_db, "SELECT system_identifier::text, current_database() FROM pg_control_system()")[0]
    assert manifest["system_identifier"] == sysid and manifest["database"] == dbname
    # backup_row_counts=false skips the scans (the manifest says there are no counts).
    off = run(seeded_db, tmp_path / "c", row_counts=False)
    assert json.loads(Path(off["manifest"]).read_text())["row_counts"] is None


def test_retention_counts_the_backups_of_one_server_under_any_hostname(seeded_db, tmp_path):
    via_localhost = seeded_db.replace("@127.0.0.1:", "@localhost:")
    backups = tmp_path / "b"
    run(seeded_db, backups, retention=0, row_counts=False)
    second = run(via_localhost, backups, retention=0, row_counts=False)
    third = run(seeded_db, backups, retention=2, row_counts=False)
    assert Path(second["backup_file"]).name.startswith("localhost-")
    assert sorted(p.name for p in backups.glob("*.dump")) == sorted(
        Path(f).name for f in (second["backup_file"], third["backup_file"]))
    identity = {"system_identifier": second["system_identifier"], "database": second["database"]}
    newest = bu.find_newest_verified(str(backups), bu.target_slug(via_localhost), identity)
    assert newest["backup_path"] == third["backup_file"]


def test_counts_and_dump_share_one_snapshot(seeded_db, tmp_path):
    """Rows inserted while the dump runs are neither counted nor dumped: the restore check still agrees."""
    stop = threading.Event()

    def writer():
        conn = psycopg2.connect(seeded_db)
        conn.autocommit = True
        n = 100000
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("INSERT INTO public.customers VALUES (%s, 'late', 'x')", (n,))
                n += 1
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        result = run(seeded_db, tmp_path / "b", verify="restore")
    finally:
        stop.set()
        thread.join()
    assert result["verified"] and result["restore_check"]["rows"] == sum(result["row_counts"].values())
    assert sql(seeded_db, "SELECT count(*) FROM public.customers")[0][0] > result["row_counts"]["public.customers"]


def test_truncated_and_byte_flipped_dumps_are_rejected(seeded_db, tmp_path):
    result = run(seeded_db, tmp_path / "b")
    good = Path(result["backup_file"])
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert bu.full_read_check(str(good))["ok"]
    assert bu.verify_backup(str(good), manifest)["ok"]

    truncated = tmp_path / "truncated.dump"
    shutil.copy(good, truncated)
    with open(truncated, "r+b") as fh:
        fh.truncate(good.stat().st_size * 2 // 3)
    flipped = tmp_path / "flipped.dump"
    shutil.copy(good, flipped)
    with open(flipped, "r+b") as fh:
        fh.seek(good.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))

    for bad in (truncated, flipped):
        # What the runbook does is not enough: --list only reads the table of contents.
        listing = subprocess.run([os.path.join(bu.find_bindir(15), "pg_restore"), "--list", str(bad)],
                                 capture_output=True, text=True, check=False)
        assert listing.returncode == 0
        read = bu.full_read_check(str(bad))
        assert not read["ok"] and read["rc"] != 0 and read["error"], bad.name
        with pytest.raises(LedgerError, match="does not match its manifest"):
            bu.verify_against_manifest(str(bad), manifest)


def test_directory_format_with_parallel_jobs(seeded_db, tmp_path):
    result = run(seeded_db, tmp_path / "b", format="directory", jobs=2, compress=0)
    path = Path(result["backup_file"])
    assert path.is_dir() and path.name.endswith(".dir") and result["verified"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["jobs"] == 2 and manifest["format"] == "directory" and "toc.dat" in manifest["files"]
    assert bu.verify_backup(str(path), manifest)["ok"]
    victim = next(p for p in path.iterdir() if p.name != "toc.dat")
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(LedgerError, match="files differing: %s" % victim.name):
        bu.verify_against_manifest(str(path), manifest)


def test_jobs_need_directory_format(seeded_db, tmp_path):
    with pytest.raises(LedgerError, match="needs backup_format=directory"):
        run(seeded_db, tmp_path / "b", jobs=2)


def test_dump_never_queues_behind_an_exclusive_lock(seeded_db, tmp_path):
    locker = psycopg2.connect(seeded_db)
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE public.customers IN ACCESS EXCLUSIVE MODE")
    started = time.time()
    try:
        with pytest.raises(LedgerError) as info:
            run(seeded_db, tmp_path / "b", lock_wait_timeout="1s")
    finally:
        locker.rollback()
        locker.close()
    assert time.time() - started < 8
    assert "pg_dump of postgres@127.0.0.1" in info.value.msg and "exclusive lock" in info.value.msg
    assert info.value.fields["sqlstate"] == "57014" and "SQLSTATE 57014" in info.value.msg
    assert "playbooks/backup.yml" in info.value.msg
    assert info.value.fields["verified"] is False
    assert list((tmp_path / "b").iterdir()) == []  # no partial file left behind
    assert backup_events(seeded_db)[-1][0] == "failed"


def test_world_readable_backup_dir_refused_before_dumping(seeded_db, tmp_path):
    backups = tmp_path / "b"
    backups.mkdir()
    os.chmod(backups, 0o755)
    with pytest.raises(LedgerError, match="chmod 0700"):
        run(seeded_db, backups)
    assert list(backups.iterdir()) == []


def test_check_mode_takes_no_backup_and_creates_nothing(seeded_db, tmp_path):
    result = run(seeded_db, tmp_path / "b", check_mode=True)
    assert result["changed"] and result["msg"].startswith("would back up")
    assert not (tmp_path / "b").exists()
    assert backup_events(seeded_db) == []


def test_schema_version_comes_from_the_history(seeded_db, tmp_path):
    sql(seeded_db, "CREATE SCHEMA migrations; CREATE TABLE migrations.history (version text);"
                   "INSERT INTO migrations.history VALUES ('0008'), ('0009')")
    result = run(seeded_db, tmp_path / "b")
    assert result["schema_version"] == "0009" and "_0009_" in Path(result["backup_file"]).name
    assert json.loads(Path(result["manifest"]).read_text())["applied"] == ["0008", "0009"]


def test_password_is_never_in_results_manifests_or_events(seeded_db, pg_cluster, tmp_path):
    role = "bk_" + uuid.uuid4().hex[:8]
    password = "S3cr:et@pw/" + uuid.uuid4().hex[:6]
    sql(pg_cluster.url(), f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD %s", (password,))
    try:
        dbname = seeded_db.rsplit("/", 1)[1]
        quoted = password.replace(":", "%3A").replace("@", "%40").replace("/", "%2F")
        url = f"postgresql://{role}:{quoted}@127.0.0.1:{pg_cluster.port}/{dbname}"
        result = run(url, tmp_path / "b")
        texts = [json.dumps(result), Path(result["manifest"]).read_text(), json.dumps(backup_events(seeded_db))]
        for text in texts:
            assert password not in text and quoted not in text
        assert result["target"] == f"{role}@127.0.0.1:{pg_cluster.port}/{dbname}"
    finally:
        sql(seeded_db, f"REASSIGN OWNED BY {role} TO postgres")
        sql(pg_cluster.url(), f"DROP ROLE {role}")


# --------------------------------------------------------------------------- manifests and retention

def test_retention_applies_after_each_real_backup(seeded_db, tmp_path):
    files = []
    for _ in range(3):
        files.append(run(seeded_db, tmp_path / "b", retention=2)["backup_file"])
    # Backups within one second get distinct names (a -2 suffix) and are ordered by their start time.
    assert len(set(files)) == 3
    assert sorted(p.name for p in (tmp_path / "b").glob("*.dump")) == sorted(Path(f).name for f in files[1:])
    newest = bu.find_newest_verified(str(tmp_path / "b"), bu.target_slug(seeded_db))
    assert newest["backup_path"] == files[-1]


def test_unreachable_target_fails_with_the_target_and_no_password(tmp_path):
    with pytest.raises(LedgerError) as info:
        run("postgresql://someone:hunter2@127.0.0.1:1/ledger", tmp_path / "b", connect_timeout=2)
    assert "someone@127.0.0.1:1/ledger" in info.value.msg and "hunter2" not in info.value.msg
    assert "re-run: the same ansible-playbook command (to back up alone: `ansible-playbook playbooks/backup.yml" \
        " -l <limit>`)" in info.value.msg
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- a full disk (issue 17)

def mount_tmpfs(mnt, size):
    """A real tmpfs of ``size`` bytes at ``mnt`` (mounting needs root: the test is skipped otherwise, saying so)."""
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real ENOSPC needs a small tmpfs, and mounting one needs root (CI runs as root)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d,mode=0700" % size, "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip("cannot mount a small tmpfs for a real ENOSPC: %s" % res.stderr.strip())


@pytest.fixture
def small_fs(tmp_path):
    """A real 16 KiB tmpfs."""
    mnt = tmp_path / "small"
    mount_tmpfs(mnt, 16 * 1024)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def refused_for_space(ledger_db, backup_dir, run_id):
    """A backup into a full ``backup_dir``: refused saying so with the space needed, no file left in it,
    its backup:failed event logged. Returns the LedgerError."""
    args = {"database_url": ledger_db, "backup_dir": str(backup_dir), "run_id": run_id, "retention": 0,
            "space_margin": 0.0001}  # past the up-front space check: the disk itself must refuse
    with pytest.raises(LedgerError) as err:
        backup.run_backup(args)
    assert "No space left on device" in err.value.msg and "needs about" in err.value.msg, err.value.msg
    assert err.value.fields["verified"] is False
    assert os.listdir(backup_dir) == []  # neither the dump nor a partial manifest
    row = sql(ledger_db, "SELECT outcome, detail->>'error' FROM migrations.events WHERE action = 'backup'"
                         " AND run_id = %s", (run_id,))
    assert row and row[0][0] == "failed" and "No space left" in row[0][1]
    return err.value


def test_a_full_disk_is_a_clean_refusal_that_leaves_no_file_and_logs_the_event(ledger_db, small_fs):
    """ENOSPC from the OS (a full tmpfs) while pg_dump writes: refused, nothing kept, backup:failed logged."""
    refused_for_space(ledger_db, small_fs / "backups", "enospc-run")


@pytest.mark.parametrize("short", [0, 1], ids=["at_the_manifest", "at_the_dumps_last_page"])
def test_a_disk_that_holds_the_dump_but_not_its_manifest_is_a_clean_refusal(ledger_db, tmp_path, short):
    """A real full disk at the manifest: a tmpfs exactly the size of the dump (in pages), so the dump fits and
    the manifest's first page does not (and, one page smaller, at the dump's end, where pg_dump may exit 0
    with its output cut short: the full read catches it, and the message must still say the disk is full).
    The dump's size is measured by a probe backup of the same database, whose traces (its event, the events
    sequence) are then undone: the real dump has the same bytes but its timestamps, so the same size."""
    def probe(name):
        """A backup elsewhere, then its traces undone (its events, the events sequence): the dump's size."""
        result = backup.run_backup({"database_url": ledger_db, "backup_dir": str(tmp_path / name), "run_id": "probe",
                                    "retention": 0})
        seq = sql(ledger_db, "SELECT pg_get_serial_sequence('migrations.events', 'id')")[0][0]
        sql(ledger_db, "DELETE FROM migrations.events WHERE run_id = 'probe'")
        sql(ledger_db, "SELECT setval(%s, coalesce((SELECT max(id) FROM migrations.events), 1),"
                       " (SELECT count(*) > 0 FROM migrations.events))", (seq,))
        return result

    probe("first")  # creates the records (migrations.*) a backup logs into: part of every later dump
    dump_bytes = os.path.getsize(probe("probe")["backup_file"])
    history = sql(ledger_db, "SELECT version FROM migrations.history ORDER BY version")
    page = os.sysconf("SC_PAGE_SIZE")
    mnt = tmp_path / "exact"
    mount_tmpfs(mnt, (-(-dump_bytes // page) - short) * page)
    try:
        (mnt / "backups").mkdir(mode=0o700)
        err = refused_for_space(ledger_db, mnt / "backups", "manifest-enospc")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    if short:
        assert "cut pg_dump's output short" in err.msg and "It was deleted" in err.msg
    else:
        # Refused at the manifest: the dump was complete and verified, and is gone with it.
        assert "Nothing was kept" in err.msg and "nothing was migrated" in err.msg
        assert err.fields["errno"] == 28
    assert sql(ledger_db, "SELECT version FROM migrations.history ORDER BY version") == history
