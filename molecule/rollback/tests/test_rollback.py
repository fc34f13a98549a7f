"""After converge: the restore brought back the newest version with the ledger row the revert had dropped.

The set is files/migrations: the runbook's 0008-0011, and any of the operator's own above them.
"""

import os
import json

from ledgertest import shipped_versions

PORT_BASE = int(os.environ.get("LEDGER_MOLECULE_PORT_BASE", "55600"))
URL = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 31}"


def sql(host, query, db="ledger"):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", "%s/%s" % (URL, db), query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


def test_the_restore_brought_back_every_migration(host):
    assert sql(host, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history") == \
        ",".join(shipped_versions())


def test_the_row_the_revert_dropped_is_back(host):
    assert sql(host, "SELECT count(*) FROM public.credit_lots"
                     " WHERE community_id = '44444444-4444-4444-4444-444444444444'") == "1"


def test_the_restore_is_in_the_restored_events_log(host):
    row = sql(host, "SELECT outcome || ' ' || (detail->>'previous_database') FROM migrations.events"
                    " WHERE action = 'restore' ORDER BY id DESC LIMIT 1")
    assert row.startswith("ok ledger_pre_restore_")


def test_the_database_before_the_restore_is_kept_at_0008(host):
    kept = sql(host, "SELECT datname FROM pg_database WHERE datname LIKE 'ledger\\_pre\\_restore\\_%'", db="postgres")
    assert len(kept.splitlines()) == 1
    assert sql(host, "SELECT string_agg(version, ',') FROM migrations.history", db=kept) == "0008"
    assert sql(host, "SELECT to_regclass('public.credit_lots') IS NULL", db=kept) == "t"


def test_every_revert_is_recorded_newest_first(host):
    # 0009: the newest down to 0010; base: 0009, 0008 (as of the backup restored last, taken before the third
    # revert).
    reverts = sql(host, "SELECT string_agg(version, ',' ORDER BY id) FROM migrations.events"
                        " WHERE action = 'revert' AND outcome = 'ok'")
    assert reverts == ",".join([v for v in reversed(shipped_versions()) if v > "0009"] + ["0009", "0008"])


def test_the_backup_restored_is_the_one_the_override_took_at_the_newest_version(host):
    # Taken by the revert with rollback_allow_data_loss (at the newest version, holding the row), verified, with
    # its manifest.
    path = sql(host, "SELECT detail->>'backup_file' FROM migrations.events WHERE action = 'restore'"
                     " ORDER BY id DESC LIMIT 1")
    assert "_%s_" % shipped_versions()[-1] in path
    manifest = host.file(path + ".json")
    assert manifest.exists and manifest.mode == 0o600
    assert '"verified": true' in manifest.content_string
    # The server's identity and the exact counts the revert's guard compared against.
    data = json.loads(manifest.content_string)
    assert data["system_identifier"] == sql(host, "SELECT system_identifier FROM pg_control_system()")
    assert data["database"] == "ledger" and data["row_counts"]["public.credit_lots"] == 1
