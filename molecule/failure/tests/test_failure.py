"""After the failing runs: the target is at 0009, the last good version, and nothing of 0010 is left."""

import os

PORT_BASE = int(os.environ.get("LEDGER_MOLECULE_PORT_BASE", "55600"))
URL = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 21}/ledger"


def sql(host, query):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", URL, query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


def test_history_stops_at_the_last_good_version(host):
    assert sql(host, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history") == "0008,0009"


def test_nothing_of_the_failed_migration_is_left(host):
    # Its first statement succeeded before line 7 failed: one transaction means it is gone too.
    assert sql(host, "SELECT to_regclass('public.molecule_failure_probe') IS NULL") == "t"


def test_the_failure_is_in_the_events_log(host):
    row = sql(host, "SELECT outcome || ' ' || coalesce(detail->>'sqlstate', '') FROM migrations.events"
                    " WHERE version = '0010' AND action = 'apply' ORDER BY id DESC LIMIT 1")
    assert row.startswith("failed") and "22012" in row


def test_the_ledger_of_0009_is_intact(host):
    assert sql(host, "SELECT to_regclass('public.lot_entries') IS NOT NULL") == "t"
