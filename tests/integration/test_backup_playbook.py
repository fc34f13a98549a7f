"""playbooks/backup.yml through ansible-playbook: a backup on demand, with progress lines.

The inventory's host sets only `database_url`; the backup directory comes as an extra var so
that the test never writes into the project's backups/.
"""

from __future__ import annotations

import json
import stat

import psycopg2

from test_precheck_playbook import inventory, playbook


def test_backup_playbook_takes_a_verified_backup_on_demand(empty_db, tmp_path):
    conn = psycopg2.connect(empty_db)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE public.things AS SELECT g AS id FROM generate_series(1, 1000) g")
    conn.close()
    backups = tmp_path / "backups"
    rc, out = playbook(["-i", str(inventory(tmp_path, empty_db)), "playbooks/backup.yml", "-l", "mydb",
                        "-e", f"backup_dir={backups}", "-e", "backup_verify=restore",
                        "-e", "backup_progress_interval=0.05"], tmp_path)
    assert rc == 0, out
    assert "changed=1" in out
    # The action plugin's progress lines appear in ansible-playbook's own output.
    assert "[mydb] backup: " in out and "database" in out
    dumps = list(backups.glob("*.dump"))
    assert len(dumps) == 1 and stat.S_IMODE(dumps[0].stat().st_mode) == 0o600
    manifest = json.loads((backups / (dumps[0].name + ".json")).read_text())
    assert manifest["verified"] is True and manifest["row_counts"] == {"public.things": 1000}
    assert "restore into a scratch database" in manifest["verify_method"]


def test_backup_playbook_failure_names_the_target_and_next_command(empty_db, tmp_path):
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o755)
    backups.chmod(0o755)
    inv = inventory(tmp_path, empty_db)
    rc, out = playbook(["-i", str(inv), "playbooks/backup.yml", "-l", "mydb", "-e", f"backup_dir={backups}"], tmp_path)
    assert rc == 2, out
    assert "backup of postgres@127.0.0.1" in out and f"chmod 0700 {backups}" in out
    # The run's own options, in the order given (the report_dir the helper adds last).
    assert (f"`ansible-playbook playbooks/backup.yml -i {inv} -l mydb -e backup_dir={backups}"
            f" -e report_dir={tmp_path / 'reports'}`") in " ".join(out.split())
    assert list(backups.iterdir()) == []
