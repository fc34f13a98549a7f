"""After converge: recovered to the restore point taken before 0010, then migrated again."""

import json
import os
from pathlib import Path

from ledgertest import shipped_versions

PORT_BASE = int(os.environ.get("LEDGER_MOLECULE_PORT_BASE", "55600"))
URL = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 61}/ledger"
REPORTS = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "reports"


def sql(host, query):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", URL, query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


def test_migrated_again_after_the_recovery(host):
    assert sql(host, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history") == \
        ",".join(shipped_versions())


def test_the_row_before_the_restore_point_stayed_and_the_one_after_is_gone(host):
    rows = sql(host, "SELECT string_agg(source || ' ' || amount_micro, ',' ORDER BY source) FROM public.credit_lots"
                     " WHERE community_id = '55555555-5555-5555-5555-555555555555'")
    assert rows == "seed 1000000"


def test_the_recovery_is_an_event_of_the_recovered_database(host):
    row = sql(host, "SELECT outcome || ' ' || (detail->>'method') || ' ' || (detail->>'restore_point')"
                    " FROM migrations.events WHERE action = 'restore'")
    assert row.startswith("ok pgbackrest ledger-")


def test_the_cluster_runs_on_a_new_timeline_and_archives_it(host):
    assert sql(host, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == "00000002"
    assert sql(host, "SELECT failed_count FROM pg_stat_archiver") == "0"


def test_each_migrate_run_took_a_restore_point(host):
    # The second run's backup event came after its restore point: the recovery discarded it.
    points = sql(host, "SELECT count(*) FROM migrations.events WHERE action = 'backup' AND outcome = 'ok'"
                       " AND detail->>'method' = 'pgbackrest'")
    assert int(points) == 2


def test_the_last_precheck_listed_the_data_directory_kept_by_the_recovery(host):
    """The migrate run after the recovery: its pgBackRest precheck listed <data>.pre_pitr_<stamp> (a warning, with
    the command that removes it), and the converge's run report records it."""
    data_dir = sql(host, "SHOW data_directory")
    converge = [r for r in (json.loads(p.read_text()) for p in REPORTS.glob("*.json"))
                if str(r.get("playbook", "")).endswith("converge.yml")]
    assert len(converge) == 1, f"expected the converge's report in {REPORTS}"
    listed = converge[0]["targets"]["ledger-pitr"]["pitr_leftovers"]
    assert [d["kind"] for d in listed] == ["kept"], listed
    assert listed[0]["path"].startswith(data_dir + ".pre_pitr_") and host.file(listed[0]["path"]).is_directory
    assert listed[0]["remove_command"] == \
        "rm -rf %s   # as root on the database host, once nothing in it is wanted" % listed[0]["path"]
