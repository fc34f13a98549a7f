"""7. pitr: backup_method=pgbackrest against pg_dump, for the backup stage and the way back (issue 15).

Its own PostgreSQL 15 cluster that archives to a local pgBackRest repository (scripts/pgcluster.py
--archive pgbackrest, stanza `bench`, lz4, 2 processes; the binary is LEDGER_PGBACKREST_BIN's, else
the system's pgbackrest). With a pgBackRest that has block incremental (>= 2.46, e.g.
`LEDGER_PGBACKREST_BIN=$(python3 scripts/pgbackrest_newer.py)`), archive_command pushes the WAL
to two repositories: `repo` (repo-bundle, repo-block) and `repo-plain` (whole files, as 2.45
does), each with its own config file for the backups; with 2.45 only `repo-plain` exists and
the block rows say n/a. For each size: the sized data in one database, then a full backup in
each repository (untimed: a production repository has one, taken nightly). Then, per run, side
by side on that same database:
  * a day-like change: 1 % of each table's rows appended (datagen.append_share), untimed;
  * backup stage, pgbackrest incr, with and without block incremental (alternating which goes
    first): playbooks/backup.yml -e backup_method=pgbackrest -e pgbackrest_backup_type=incr
    (the backup role's time, and the whole command);
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
import subprocess
import time
from pathlib import Path

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


def _repositories(cl) -> dict:
    """{'block': config or None, 'plain': config}: one config file per repository (see the docstring)."""
    pgb = cl.state["pgbackrest"]
    if not pgcluster.block_incremental(pgb["binary"]):
        return {"block": None, "plain": pgb["config"]}
    main = Path(pgb["config"])
    block_conf, plain_conf = main.with_name("block.conf"), main.with_name("plain.conf")
    text = main.read_text()
    block_conf.write_text(text)
    plain_repo = main.parent / "repo-plain"
    plain_repo.mkdir(mode=0o750, exist_ok=True)
    plain_conf.write_text(text.replace(f"repo1-path={main.parent / 'repo'}\n", f"repo1-path={plain_repo}\n")
                          .replace("repo1-bundle=y\nrepo1-block=y\n", ""))
    # archive_command's config pushes every segment to both repositories.
    main.write_text(text.replace("[global]\n", f"[global]\nrepo2-path={plain_repo}\nrepo2-retention-full=2\n", 1))
    for path in (block_conf, plain_conf, plain_repo):
        shutil.chown(path, cl.state["os_user"], cl.state["os_user"])
    pgcluster.pgbackrest(dict(pgb, config=str(plain_conf)), "stanza-create", timeout=600)
    return {"block": str(block_conf), "plain": str(plain_conf)}


def _run(ctx, res, cl, runs):
    pgb = cl.state["pgbackrest"]
    run_dir = ctx.run_dir("pitr")
    inventory = write_inventory(run_dir / "inventory.yml", {"bench": {"t1": cl.url(DB)}})
    repos = _repositories(cl)
    version = subprocess.run([pgb["binary"], "version"], capture_output=True, text=True, check=False).stdout.strip()
    log(f"pitr: {version} ({pgb['binary']}); block incremental: {'on' if repos['block'] else 'n/a (needs 2.46)'}")
    # The restore points (none) and the PITR use the block repository when there is one.
    main_conf = repos["block"] or repos["plain"]
    common = {"backup_dir": str(run_dir / "backups"), "report_dir": str(run_dir / "reports"),
              "pgbackrest_stanza": STANZA, "pgbackrest_config": main_conf, "pgbackrest_bin": pgb["binary"],
              "pgbackrest_os_user": cl.state["os_user"]}
    kinds = {"block": {"pgbackrest_config": repos["block"], "pgbackrest_block_incremental": "true"},
             "plain": {"pgbackrest_config": repos["plain"], "pgbackrest_block_incremental": "false"}}
    kinds = {k: v for k, v in kinds.items() if v["pgbackrest_config"]}

    def playbook(name, extra, what):
        return ctx.ansible.playbook(name, inventory, "t1", dict(common, **extra), timeout=14400, what=what)

    def pgbackrest(*args, config=None):
        for conf in [config] if config else [c for c in repos.values() if c]:
            pgcluster.pgbackrest(dict(pgb, config=conf), *args, timeout=14400)

    for gb in [g for g in ctx.args.sizes if g > 0] or [0.2]:
        tag = f"{gb:g} GB"
        cl.drop_db(DB)
        cl.create_db(DB)
        log(f"pitr {tag}: generating the data in the archiving cluster")
        info = datagen.generate(cl, DB, gb)
        log(f"pitr {tag}: {human_bytes(info['bytes'])}; full backup in each repository (untimed)")
        full_s = {}
        for kind, extra in kinds.items():
            t = time.perf_counter()
            pgbackrest("--type=full", "backup", config=extra["pgbackrest_config"])
            full_s[kind] = time.perf_counter() - t
        times = {k: [] for k in ("incr", "incr_role", "incr_block", "incr_block_role", "none", "none_role",
                                 "none_nocount", "none_nocount_role", "dump", "dump_role", "pitr", "pitr_role",
                                 "restore", "restore_role")}
        for i in range(runs):
            appended = datagen.append_share(cl, DB, 0.01)
            expected = _orders(cl)
            log(f"pitr {tag} run {i + 1}/{runs}: appended {appended:,} rows (1 %); shop.orders {expected:,}")
            # Alternating which incr goes first cancels what the first one's reads leave in the page cache.
            for kind in sorted(kinds, reverse=bool(i % 2)):
                key = "incr_block" if kind == "block" else "incr"
                r = playbook("playbooks/backup.yml", dict(kinds[kind], backup_method="pgbackrest",
                                                          pgbackrest_backup_type="incr"),
                             f"backup.yml pgbackrest incr ({kind}) at {tag}")
                times[key].append(r.seconds)
                times[key + "_role"].append(r.role_seconds("backup"))
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
            block_s = f"{times['incr_block_role'][-1]:.1f} s" if times["incr_block_role"] else "n/a"
            log(f"pitr {tag} run {i + 1}/{runs}: backup role: incr {times['incr_role'][-1]:.1f} s, incr block "
                f"{block_s}, none {times['none_role'][-1]:.1f} s (no counts {times['none_nocount_role'][-1]:.1f} s), "
                f"pg_dump {times['dump_role'][-1]:.1f} s")
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
        m = {k: median(v) for k, v in times.items() if v}
        for kind, seconds in full_s.items():
            res.row(f"{tag}: pgbackrest full backup, {kind} repository (untimed setup, 1 run)", seconds, "s")
        res.row(f"{tag}: backup stage pg_dump (defaults), backup role / whole backup.yml",
                f"{m['dump_role']:.2f} s / {m['dump']:.2f} s")
        res.row(f"{tag}: backup stage pgbackrest incr after 1 % appended, role / whole",
                f"{m['incr_role']:.2f} s / {m['incr']:.2f} s")
        res.row(f"{tag}: ratio pgbackrest incr / pg_dump (backup role)", m["incr_role"] / m["dump_role"], "x",
                "< 0.1", m["incr_role"] / m["dump_role"] < 0.1)
        if "incr_block_role" in m:
            res.row(f"{tag}: backup stage pgbackrest incr, block incremental, after 1 % appended, role / whole",
                    f"{m['incr_block_role']:.2f} s / {m['incr_block']:.2f} s")
            res.row(f"{tag}: ratio pgbackrest incr block incremental / pg_dump (backup role)",
                    m["incr_block_role"] / m["dump_role"], "x", "< 0.1", m["incr_block_role"] / m["dump_role"] < 0.1)
        else:
            res.row(f"{tag}: backup stage pgbackrest incr, block incremental", "n/a", "",
                    "needs pgBackRest >= 2.46 (LEDGER_PGBACKREST_BIN)")
        res.row(f"{tag}: backup stage pgbackrest none (row counts), role / whole",
                f"{m['none_role']:.2f} s / {m['none']:.2f} s", "", "< 5 s", m["none_role"] < 5)
        res.row(f"{tag}: backup stage pgbackrest none, backup_row_counts=false, role / whole",
                f"{m['none_nocount_role']:.2f} s / {m['none_nocount']:.2f} s", "", "< 5 s",
                m["none_nocount_role"] < 5)
        res.row(f"{tag}: rollback PITR to the restore point, role / whole",
                f"{m['pitr_role']:.2f} s / {m['pitr']:.2f} s")
        res.row(f"{tag}: rollback dump restore, role / whole", f"{m['restore_role']:.2f} s / {m['restore']:.2f} s")
        res.row(f"{tag}: ratio PITR / dump restore (rollback role)", m["pitr_role"] / m["restore_role"], "x")
        res.details[tag] = {"data": info, "full_backup_s": full_s, "runs": times, "pgbackrest": version}
    shutil.rmtree(run_dir, ignore_errors=True)
