"""3. restore: rollback.yml -e rollback_mode=restore against plain pg_restore --clean.

For each size: a fresh copy of the sized data is migrated by the pipeline (untimed; it
takes the verified backup the restore will use). Then, alternating on that database:
  * the pipeline: playbooks/rollback.yml -e rollback_mode=restore (precheck, sha256
    against the manifest, the restore, records, verify);
  * the runbook: pg_restore --clean --if-exists -d <db> <the same backup file>.
After each, a row count of a data table is compared with the source as a sanity check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lib import BenchError, human_bytes, log, median, path_size, profile_table, sh


def newest_backup(backup_dir) -> str:
    """The backup file the pipeline wrote (from its manifest when there is one)."""
    manifests = sorted(backup_dir.rglob("*.json"), key=lambda p: p.stat().st_mtime)
    for man in reversed(manifests):
        try:
            data = json.loads(man.read_text())
        except ValueError:
            continue
        for key in ("backup_file", "file", "path"):
            if isinstance(data.get(key), str):
                path = Path(data[key])
                return str(path if path.is_absolute() else man.parent / path)
        stem = man.with_suffix("")
        if stem.exists():
            return str(stem)
    files = [p for p in backup_dir.rglob("*") if p.is_file() and p.suffix not in (".json", ".log")]
    if not files:
        raise BenchError(f"the pipeline wrote no backup under {backup_dir}")
    return str(max(files, key=lambda p: p.stat().st_mtime))


def sanity_count(cl, db: str) -> int | None:
    """Rows of shop.orders (None on an empty database): proves that a restore brought the data back."""
    if cl.query(db, "SELECT to_regclass('shop.orders')")[0][0] is None:
        return None
    return cl.query(db, "SELECT count(*) FROM shop.orders")[0][0]


def run(ctx, res):
    cl, runs = ctx.cluster, ctx.args.runs
    for gb in ctx.args.sizes:
        tmpl, info = ctx.sized_template(gb)
        tag = f"{gb:g} GB"
        expected = sanity_count(cl, tmpl)
        db = ctx.fresh_copy(tmpl, "bench_restore")
        run_dir = ctx.run_dir("restore")
        try:
            log(f"{tag}: migrating a copy with the pipeline (untimed: it takes the backup to restore)")
            ctx.pipeline("playbooks/migrate.yml", {"t1": db}, "t1", run_dir=run_dir, timeout=14400,
                         what=f"migrate.yml (setup of restore at {tag})")
            backup = newest_backup(run_dir / "backups")
            log(f"{tag}: backup {backup} ({human_bytes(path_size(Path(backup)))})")
            pipe, plain, pipe_restore_stage, profile = [], [], [], []
            for i in range(runs):
                order = ("pipeline", "plain") if i % 2 == 0 else ("plain", "pipeline")
                for kind in order:
                    if kind == "pipeline":
                        pr = ctx.pipeline("playbooks/rollback.yml", {"t1": db}, "t1",
                                          {"rollback_mode": "restore"}, run_dir=run_dir, timeout=14400,
                                          what=f"rollback.yml -e rollback_mode=restore at {tag}")
                        pipe.append(pr.seconds)
                        pipe_restore_stage.append(pr.role_seconds("rollback"))
                        if len(pipe) == 1:
                            print(f"\n--- {tag}: where rollback.yml rollback_mode=restore spends its time ---")
                            print(profile_table(pr.tasks) + "\n")
                            profile = pr.tasks
                        secs = pr.seconds
                    else:
                        r = sh([cl.bin("pg_restore"), "--clean", "--if-exists", "-d", cl.url(db), backup],
                                timeout=14400).check("pg_restore --clean")
                        plain.append(r.seconds)
                        secs = r.seconds
                    got = sanity_count(cl, db)
                    if got != expected:
                        raise BenchError(f"after the {kind} restore at {tag}, shop.orders has {got} rows, "
                                         f"expected {expected}")
                    log(f"{tag} run {i + 1}/{runs}: {kind} restore {secs:.2f} s (shop.orders rows {got})")
        finally:
            cl.drop_db(db)
            shutil.rmtree(run_dir, ignore_errors=True)
        p, q = median(pipe), median(plain)
        res.row(f"{tag}: plain pg_restore --clean (median of {runs})", q, "s")
        res.row(f"{tag}: rollback.yml rollback_mode=restore (rollback role {median(pipe_restore_stage):.2f} s)",
                p, "s")
        if gb > 0:
            res.row(f"{tag}: ratio pipeline / plain restore", p / q, "x")
        res.details[tag] = {"pipeline_s": pipe, "pipeline_rollback_role_s": pipe_restore_stage, "plain_s": plain,
                            "backup": backup, "pipeline_tasks": profile}
