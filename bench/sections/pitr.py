"""7. pitr: backup_method=pgbackrest against pg_dump, for the backup stage and the way back (issue 15).

Its own PostgreSQL 15 cluster that archives to a local pgBackRest repository (scripts/pgcluster.py
--archive pgbackrest, stanza `bench`, lz4, 2 processes). For each size: the sized data in one
database, then a full backup (untimed: a production repository has one, taken nightly). Then,
per run, side by side on that same database:
  * a day-like change: 1 % of each table's rows appended (datagen.append_share), untimed;
  * backup stage, pgbackrest incr: playbooks/backup.yml -e backup_method=pgbackrest
    -e pgbackrest_backup_type=incr (the backup role's time, and the whole command);
  * backup stage, pgbackrest none (a restore point only), with row counts (the default) and
    with backup_row_counts=false;
  * backup stage, pg_dump with today's defaults (custom format, -Z1, full read, row counts);
  * rollback by PITR to the `none` restore point: rollback.yml -e rollback_mode=restore
    -e backup_method=pgbackrest -e rollback_allow_data_loss=true (the restore of the whole
    cluster from the backup set, the recovery, the checks, the swap);
  * rollback by dump restore: rollback.yml -e rollback_mode=restore -e backup_method=pg_dump
    with the dump just taken.
After each way back, a row count of shop.orders is compared with the expected one. The
restore's kept database and the PITR's kept data directory are removed (untimed), and an
untimed incr follows the dump restore (its new files would otherwise land in the next incr).
"""

from __future__ import annotations

import glob
import json
import shutil
import time

import datagen
import pgcluster
from lib import BenchError, Cluster, human_bytes, log, median, write_inventory

STANZA = "bench"
DB = "bench_pitr"


def _orders(cl) -> int:
    return cl.query(DB, "SELECT count(*) FROM shop.orders")[0][0]


def run(ctx, res):
    runs = ctx.args.runs
    cl = Cluster(ctx.workdir / "pg_pitr", archive="pgbackrest", stanza=STANZA)
    try:
        _run(ctx, res, cl, runs)
    finally:
        if not ctx.args.keep:
            cl.destroy()
            shutil.rmtree(ctx.workdir / "pg_pitr", ignore_errors=True)


def _run(ctx, res, cl, runs):
    pgb = cl.state["pgbackrest"]
    run_dir = ctx.run_dir("pitr")
    inventory = write_inventory(run_dir / "inventory.yml", {"bench": {"t1": cl.url(DB)}})
    common = {"backup_dir": str(run_dir / "backups"), "report_dir": str(run_dir / "reports"),
              "pgbackrest_stanza": STANZA, "pgbackrest_config": pgb["config"],
              "pgbackrest_os_user": cl.state["os_user"]}

    def playbook(name, extra, what):
        return ctx.ansible.playbook(name, inventory, "t1", dict(common, **extra), timeout=14400, what=what)

    def pgbackrest(*args):
        pgcluster.pgbackrest(pgb, *args, timeout=14400)

    for gb in [g for g in ctx.args.sizes if g > 0] or [0.2]:
        tag = f"{gb:g} GB"
        cl.drop_db(DB)
        cl.create_db(DB)
        log(f"pitr {tag}: generating the data in the archiving cluster")
        info = datagen.generate(cl, DB, gb)
        log(f"pitr {tag}: {human_bytes(info['bytes'])}; full backup (untimed)")
        t = time.perf_counter()
        pgbackrest("--type=full", "backup")
        full_s = time.perf_counter() - t
        times = {k: [] for k in ("incr", "incr_role", "none", "none_role", "none_nocount", "none_nocount_role",
                                 "dump", "dump_role", "pitr", "pitr_role", "restore", "restore_role")}
        for i in range(runs):
            appended = datagen.append_share(cl, DB, 0.01)
            expected = _orders(cl)
            log(f"pitr {tag} run {i + 1}/{runs}: appended {appended:,} rows (1 %); shop.orders {expected:,}")
            r = playbook("playbooks/backup.yml", {"backup_method": "pgbackrest", "pgbackrest_backup_type": "incr"},
                         f"backup.yml pgbackrest incr at {tag}")
            times["incr"].append(r.seconds)
            times["incr_role"].append(r.role_seconds("backup"))
            r = playbook("playbooks/backup.yml", {"backup_method": "pgbackrest", "pgbackrest_backup_type": "none",
                                                  "backup_row_counts": False},
                         f"backup.yml pgbackrest none without counts at {tag}")
            times["none_nocount"].append(r.seconds)
            times["none_nocount_role"].append(r.role_seconds("backup"))
            r = playbook("playbooks/backup.yml", {"backup_method": "pgbackrest", "pgbackrest_backup_type": "none"},
                         f"backup.yml pgbackrest none at {tag}")
            times["none"].append(r.seconds)
            times["none_role"].append(r.role_seconds("backup"))
            manifest = max(glob.glob(str(run_dir / "backups" / "*.pitr.json")))
            r = playbook("playbooks/backup.yml", {"backup_method": "pg_dump"}, f"backup.yml pg_dump at {tag}")
            times["dump"].append(r.seconds)
            times["dump_role"].append(r.role_seconds("backup"))
            dump_manifest = max((p for p in glob.glob(str(run_dir / "backups" / "*.json"))
                                 if not p.endswith(".pitr.json")), key=lambda p: json.load(open(p))["started_at"])
            dump = dump_manifest[: -len(".json")]
            log(f"pitr {tag} run {i + 1}/{runs}: incr {times['incr'][-1]:.1f} s, none {times['none'][-1]:.1f} s "
                f"(no counts {times['none_nocount'][-1]:.1f} s), pg_dump {times['dump'][-1]:.1f} s")
            cl.execute(DB, "INSERT INTO shop.orders SELECT id + 1000000000, customer_id, status, total, created_at"
                           " FROM shop.orders ORDER BY id LIMIT 10")  # written after the restore point: lost
            r = playbook("playbooks/rollback.yml", {"rollback_mode": "restore", "backup_method": "pgbackrest",
                                                    "backup_file": manifest, "rollback_allow_data_loss": True,
                                                    "rollback_verify": False},
                         f"rollback.yml PITR at {tag}")
            times["pitr"].append(r.seconds)
            times["pitr_role"].append(r.role_seconds("rollback"))
            if _orders(cl) != expected:
                raise BenchError(f"after PITR at {tag}, shop.orders has {_orders(cl)} rows, expected {expected}")
            data_dir = cl.query("postgres", "SHOW data_directory")[0][0]
            for kept in glob.glob(data_dir + ".pre_pitr_*"):
                shutil.rmtree(kept, ignore_errors=True)
            r = playbook("playbooks/rollback.yml", {"rollback_mode": "restore", "backup_method": "pg_dump",
                                                    "backup_file": dump, "rollback_verify": False},
                         f"rollback.yml dump restore at {tag}")
            times["restore"].append(r.seconds)
            times["restore_role"].append(r.role_seconds("rollback"))
            if _orders(cl) != expected:
                raise BenchError(f"after the dump restore at {tag}, shop.orders has {_orders(cl)} rows")
            for (kept,) in cl.query("postgres", "SELECT datname FROM pg_database WHERE datname LIKE %s",
                                    (DB + "\\_pre\\_restore\\_%",)):
                cl.drop_db(kept)
            log(f"pitr {tag} run {i + 1}/{runs}: PITR {times['pitr'][-1]:.1f} s, dump restore "
                f"{times['restore'][-1]:.1f} s; re-basing the incremental chain (untimed)")
            pgbackrest("--type=incr", "backup")
        m = {k: median(v) for k, v in times.items()}
        res.row(f"{tag}: pgbackrest full backup (untimed setup, 1 run)", full_s, "s")
        res.row(f"{tag}: backup stage pg_dump (defaults), backup role / whole backup.yml",
                f"{m['dump_role']:.2f} s / {m['dump']:.2f} s")
        res.row(f"{tag}: backup stage pgbackrest incr after 1 % appended, role / whole",
                f"{m['incr_role']:.2f} s / {m['incr']:.2f} s")
        res.row(f"{tag}: ratio pgbackrest incr / pg_dump (backup role)", m["incr_role"] / m["dump_role"], "x",
                "< 0.1", m["incr_role"] / m["dump_role"] < 0.1)
        res.row(f"{tag}: backup stage pgbackrest none (row counts), role / whole",
                f"{m['none_role']:.2f} s / {m['none']:.2f} s", "", "< 5 s", m["none_role"] < 5)
        res.row(f"{tag}: backup stage pgbackrest none, backup_row_counts=false, role / whole",
                f"{m['none_nocount_role']:.2f} s / {m['none_nocount']:.2f} s", "", "< 5 s",
                m["none_nocount_role"] < 5)
        res.row(f"{tag}: rollback PITR to the restore point, role / whole",
                f"{m['pitr_role']:.2f} s / {m['pitr']:.2f} s")
        res.row(f"{tag}: rollback dump restore, role / whole", f"{m['restore_role']:.2f} s / {m['restore']:.2f} s")
        res.row(f"{tag}: ratio PITR / dump restore (rollback role)", m["pitr_role"] / m["restore_role"], "x")
        res.details[tag] = {"data": info, "full_backup_s": full_s, "runs": times}
    shutil.rmtree(run_dir, ignore_errors=True)
