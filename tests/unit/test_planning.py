"""Planning rules without a database: settings, defaults, windows, tables touched, retention, arguments."""

from __future__ import annotations

import datetime
import importlib
from pathlib import Path

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils import (
    ledger_backup_utils as bu,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_precheck_migrations import (
    tables_in_sql,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_precheck_server import (
    check_maintenance,
    window_contains,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_runner import (
    run_settings,
)

from ledgertest import ROOT, engine, inprocess, ledger_migrate_spec, via_main

ledger_migrate = importlib.import_module("ansible_collections.arrakis.ledger.plugins.modules.ledger_migrate")


def _fake_backup(directory, slug, stamp, verified=True):
    path = directory / f"{slug}_0011_{stamp}.dump"
    path.write_bytes(b"x")
    bu.write_manifest(str(path), {"kind": "ledger-backup", "target_slug": slug, "started_at": stamp,
                                  "verified": verified, "sha256": bu.sha256_path(str(path))[0], "size_bytes": 1})
    return path


def test_lock_wait_defaults_to_lock_ttl_plus_30_seconds():
    """A re-run started right after a killed run must outwait the dead run's lease (at most lock_ttl)."""
    assert run_settings({})["lock_wait"] == 90.0
    assert run_settings({"lock_ttl": 10})["lock_wait"] == 40.0
    assert run_settings({"lock_ttl": 10, "lock_wait": 3})["lock_wait"] == 3.0
    assert engine.Lease("postgresql://x@h/d", None, "r", ttl=20).wait == 50.0


def test_a_failed_apply_or_revert_reports_changed_when_it_did_part_of_its_work():
    changed = ledger_migrate.failure_changed
    assert changed("apply", False, {"applied": ["0003"]}) is True
    assert changed("apply", False, {"applied": [], "statements_applied": [3]}) is True  # a half-run no-tx file
    assert changed("apply", False, {"applied": []}) is False
    assert changed("apply", True, {"applied": ["0003"]}) is False  # check mode never changes anything
    assert changed("revert", False, {"reverted": ["0003"]}) is True
    # status reports the history rows as `applied`: a status failure (drift) changed nothing.
    assert changed("status", False, {"applied": [{"version": "0001"}]}) is False


def test_the_role_and_module_default_lock_wait_outlasts_the_lease_ttl():
    import jinja2
    import yaml

    defaults = yaml.safe_load((ROOT / "roles" / "migrate" / "defaults" / "main.yml").read_text())
    rendered = jinja2.Template(defaults["migrate_lock_wait"]).render(migrate_lock_ttl=defaults["migrate_lock_ttl"])
    assert float(rendered) == 90.0
    assert float(jinja2.Template(defaults["migrate_lock_wait"]).render(migrate_lock_ttl=5)) == 35.0
    assert defaults["migrate_direct_url"] == ""
    assert "default" not in ledger_migrate_spec()["lock_wait"]  # so the engine computes lock_ttl + 30


def test_sql_tables_are_derived_roughly():
    sql = """-- CREATE TABLE public.in_a_comment (x int);
    CREATE TABLE IF NOT EXISTS credit_lots (id int REFERENCES app.communities (id));
    CREATE INDEX CONCURRENTLY lots_idx ON public.lot_entries (lot_id);
    ALTER TABLE ONLY "public"."usage_events" ADD COLUMN x int;
    INSERT INTO app.audit VALUES (1) ON CONFLICT DO NOTHING;"""
    assert tables_in_sql(sql) == {"public.credit_lots", "app.communities", "public.lot_entries",
                                           "public.usage_events", "app.audit"}


def test_window_across_midnight_and_days():
    window = {"start": "22:00", "end": "02:00", "days": ["sat"], "timezone": "Europe/Paris"}
    utc = datetime.timezone.utc
    # Saturday 23:30 Paris (21:30 UTC in winter) is inside; Sunday 01:30 Paris too (opened Saturday).
    assert window_contains(window, datetime.datetime(2025, 1, 4, 22, 30, tzinfo=utc))[0]
    assert window_contains(window, datetime.datetime(2025, 1, 5, 0, 30, tzinfo=utc))[0]
    # Sunday 23:30 Paris is outside (Sunday is not a window day); Saturday 21:00 Paris too.
    assert not window_contains(window, datetime.datetime(2025, 1, 5, 22, 30, tzinfo=utc))[0]
    assert not window_contains(window, datetime.datetime(2025, 1, 4, 20, 0, tzinfo=utc))[0]
    bad = check_maintenance("production", False, {"start": "25:00", "end": "01:00"})
    assert bad["passed"] is False and "not HH:MM" in bad["message"]


def test_retention_keeps_the_newest_and_never_the_newest_verified(tmp_path):
    old_ok = _fake_backup(tmp_path, "db-1", "20250101T000000Z", verified=True)
    mid_ok = _fake_backup(tmp_path, "db-1", "20250102T000000Z", verified=True)
    new_bad = [_fake_backup(tmp_path, "db-1", f"2025010{d}T000000Z", verified=False) for d in (3, 4)]
    other = _fake_backup(tmp_path, "db-2", "20240101T000000Z")
    assert bu.find_newest_verified(str(tmp_path), "db-1")["backup_path"] == str(mid_ok)
    # Newest two kept by count; mid_ok is the newest verified one, so only old_ok would go.
    assert bu.apply_retention(str(tmp_path), "db-1", 2, check_mode=True) == [str(old_ok)]
    assert mid_ok.exists()
    removed = bu.apply_retention(str(tmp_path), "db-1", 1)
    # The two newest are unverified: the newest (kept by count) and mid_ok (the newest verified) stay.
    assert removed == [str(new_bad[0]), str(old_ok)]
    assert sorted(p.name for p in tmp_path.glob("db-1_*.dump")) == [mid_ok.name, new_bad[1].name]
    assert not Path(str(old_ok) + ".json").exists()
    assert other.exists()  # another target's backups are never touched
    assert bu.apply_retention(str(tmp_path), "db-1", 0) == []


def test_find_newest_verified_ignores_missing_files_and_foreign_json(tmp_path):
    gone = _fake_backup(tmp_path, "db-1", "20250105T000000Z")
    kept = _fake_backup(tmp_path, "db-1", "20250101T000000Z")
    gone.unlink()
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{")
    assert bu.find_newest_verified(str(tmp_path), "db-1")["backup_path"] == str(kept)
    assert bu.find_newest_verified(str(tmp_path), "db-9") is None


@pytest.mark.parametrize("name,args", [
    ("ledger_migrate", {"database_url": "postgresql://u@h/db", "migrations_dir": "/m", "bogus": 1}),
    ("ledger_migrate", {"database_url": "postgresql://u@h/db", "migrations_dir": "/m", "lock_retries": "many"}),
    ("ledger_migrate", {"database_url": "postgresql://u@h/db", "migrations_dir": "/m", "action": "explode"}),
    ("ledger_migrate", {"database_url": "postgresql://u@h/db", "migrations_dir": "/m", "action": "revert"}),
    ("ledger_migrate", {"migrations_dir": "/m"}),
    ("ledger_rollback", {"database_url": "postgresql://u@h/db", "rollback_to": "0008", "versions": ["0009"]}),
    ("ledger_precheck", {"database_url": "postgresql://u@h/db", "accepted_versions": ["fifteen"]}),
    ("ledger_backup", {"database_url": "postgresql://u@h/db", "backup_dir": "/b", "jobs": "x", "nope": True}),
    ("ledger_verify", {"database_url": "postgresql://u@h/db", "leak_attempts": {"a": 1}}),
])
def test_invalid_arguments_fail_exactly_as_with_ansible_module(name, args):
    expected = via_main(name, args)
    got = inprocess.call(name, args, check_mode=False)
    assert expected["failed"] is True and got["failed"] is True
    assert got["msg"] == expected["msg"]
