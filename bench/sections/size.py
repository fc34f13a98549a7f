"""2. size: backup choices and the total pipeline at the given sizes of pre-existing data.

For each size (GB of pre-existing data, several tables, ~40% incompressible):
  a) every backup choice made by hand (pg_dump -Fc at the default level, -Z1, -Z0,
     -Fd -j2 ...): dump time, size, the runbook's pg_restore --list and a full read
     (pg_restore -f /dev/null, what the pipeline's verification does at least);
  b) the pipeline's backup stage with the same choice (playbooks/backup.yml with
     backup_format / backup_compress / backup_jobs), its time inside the playbook;
  c) the total pipeline (migrate.yml) against bench/runbook.sh on fresh copies,
     alternating, with the goal total <= 1.0x the script; also with the fastest
     choice when it is not the role's default.
"""

from __future__ import annotations

import shutil

from lib import (ROOT, BenchError, human_bytes, log, median, path_size, profile_table, role_defaults, role_options,
                 run_runbook, sh)

GOAL_TOTAL = 1.0

# label, pg_dump arguments, pipeline choice (format, compress, jobs)
CHOICES = [
    ("-Fc (default -Z, 6)", ["-Fc"], ("custom", 6, None)),
    ("-Fc -Z1", ["-Fc", "-Z1"], ("custom", 1, None)),
    ("-Fc -Z0", ["-Fc", "-Z0"], ("custom", 0, None)),
    ("-Fd -j2 (default -Z, 6)", ["-Fd", "-j2"], ("directory", 6, 2)),
    ("-Fd -j2 -Z1", ["-Fd", "-j2", "-Z1"], ("directory", 1, 2)),
    ("-Fd -j2 -Z0", ["-Fd", "-j2", "-Z0"], ("directory", 0, 2)),
]


def backup_vars(choice) -> dict | None:
    """The backup role's variables for a choice, in the spelling its argument specs use (None: no role)."""
    opts = role_options("backup")
    if not opts:
        return None
    fmt, compress, jobs = choice
    out = {}
    if "backup_format" in opts:
        allowed = [str(c) for c in (opts["backup_format"].get("choices") or [])]
        spelled = fmt if not allowed or fmt in allowed else next((c for c in allowed if c.startswith(fmt[0])), fmt)
        out["backup_format"] = spelled
    elif fmt != "custom":
        return None
    if compress is not None:
        if "backup_compress" not in opts:
            return None
        out["backup_compress"] = compress
    if jobs is not None:
        if "backup_jobs" not in opts:
            return None
        out["backup_jobs"] = jobs
    return out


def default_choice_label() -> str:
    """The backup role's defaults in pg_dump's words, e.g. '-Fc -Z1'."""
    d = role_defaults("backup")
    if not d:
        return "role defaults"
    fmt = {"custom": "-Fc", "directory": "-Fd"}.get(str(d.get("backup_format", "custom")), str(d.get("backup_format")))
    out = f"{fmt} -Z{d.get('backup_compress', '?')}"
    if str(d.get("backup_jobs", 1)) not in ("1", "None"):
        out += f" -j{d['backup_jobs']}"
    return out


def raw_dump(cl, db: str, args: list, out_dir) -> dict:
    target = out_dir / ("dump.d" if "-Fd" in args else "dump.custom")
    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    r = sh([cl.bin("pg_dump"), *args, "-f", target, "-d", cl.url(db)], timeout=7200).check(f"pg_dump {' '.join(args)}")
    size = path_size(target)
    lst = sh([cl.bin("pg_restore"), "--list", target], timeout=600).check("pg_restore --list")
    read = sh([cl.bin("pg_restore"), "-f", "/dev/null", target], timeout=7200).check("pg_restore -f /dev/null")
    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    return {"dump_s": r.seconds, "bytes": size, "list_s": lst.seconds, "full_read_s": read.seconds}


def backup_files_size(run_dir) -> int:
    """Bytes of the backup(s) the pipeline wrote (manifests and logs excluded)."""
    root = run_dir / "backups"
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and not p.name.endswith((".json", ".log", ".sha256")))


def report_choices(res, tag: str, per_choice: dict, runs: int):
    """Print the per-choice table, add its rows; the fastest pipeline choice (label, seconds, vars) or None."""
    print(f"\n--- {tag}: backup choices (medians of {runs}) ---")
    print(f"{'choice':<22} {'pg_dump':>9} {'size':>10} {'--list':>8} {'full read':>10} "
          f"{'dump+read':>10} {'pipeline stage':>15}")
    best = None
    for label, args, choice in CHOICES:
        raw = per_choice[label]["raw"]
        d, b, lst, rd = (median([x[k] for x in raw]) for k in ("dump_s", "bytes", "list_s", "full_read_s"))
        pipe_s = median([x["backup_role_s"] for x in per_choice[label]["pipe"]])
        print(f"{label:<22} {d:8.2f}s {human_bytes(b):>10} {lst:7.2f}s {rd:9.2f}s {d + rd:9.2f}s "
              f"{(f'{pipe_s:.2f}s' if pipe_s is not None else 'n/a'):>15}")
        res.row(f"{tag}: pg_dump {label} ({human_bytes(b)}, full read {rd:.2f} s)", d, "s")
        if pipe_s is not None:
            res.row(f"{tag}: pipeline backup stage, {label}", pipe_s, "s")
            if best is None or pipe_s < best[1]:
                best = (label, pipe_s, backup_vars(choice))
    print()
    return best


def run(ctx, res):
    cl, runs = ctx.cluster, ctx.args.runs
    have_backup_pb = (ROOT / "playbooks" / "backup.yml").exists()
    res.details["pipeline_default_backup"] = default_choice_label()
    errors = []
    for gb in ctx.args.sizes:
        tmpl, info = ctx.sized_template(gb)
        tag = f"{gb:g} GB"
        res.details.setdefault("data", {})[tag] = info
        res.row(f"{tag}: pre-existing data ({info['tables']} tables)", info["bytes"], "B")
        db = ctx.fresh_copy(tmpl, "bench_size_dump")
        scratch = ctx.workdir / "dumps"
        scratch.mkdir(exist_ok=True)
        per_choice = {label: {"raw": [], "pipe": []} for label, _a, _c in CHOICES}
        try:
            # On an empty database every choice dumps nothing: only the totals are measured.
            for i in range(runs if gb > 0 else 0):
                for label, args, choice in CHOICES:
                    r = raw_dump(cl, db, args, scratch)
                    per_choice[label]["raw"].append(r)
                    msg = (f"{tag} run {i + 1}/{runs}: pg_dump {label}: {r['dump_s']:.2f} s, "
                           f"{human_bytes(r['bytes'])}, full read {r['full_read_s']:.2f} s")
                    variables = backup_vars(choice)
                    if have_backup_pb and variables is not None:
                        run_dir = ctx.run_dir("backup")
                        try:
                            pr = ctx.pipeline("playbooks/backup.yml", {"t1": db}, "t1", variables, run_dir=run_dir,
                                              what=f"backup.yml {variables}")
                            p = {"backup_role_s": pr.role_seconds("backup"), "wall_s": pr.seconds,
                                 "bytes": backup_files_size(run_dir), "vars": variables}
                            per_choice[label]["pipe"].append(p)
                            msg += (f"; pipeline backup stage {p['backup_role_s']:.2f} s "
                                    f"(playbook {p['wall_s']:.2f} s, {human_bytes(p['bytes'])})")
                        except BenchError as exc:
                            errors.append(f"{tag} backup.yml {label}: {exc}")
                            msg += "; pipeline backup FAILED"
                        finally:
                            shutil.rmtree(run_dir, ignore_errors=True)
                    log(msg)
        finally:
            cl.drop_db(db)

        if gb == 0:
            log("0 GB: an empty database; backup choices are not compared (see the overhead section)")
            best = None
        else:
            best = report_choices(res, tag, per_choice, runs)
        res.details.setdefault("choices", {})[tag] = per_choice


        # Total: the whole pipeline against the scripted runbook, alternating, fresh copies.
        variants = [("defaults", {})]
        if best and best[2]:
            variants.append((f"backup {best[0]}", best[2]))
        totals = {name: [] for name, _v in variants}
        backup_in_pipe = {name: [] for name, _v in variants}
        script, script_dump = [], []
        profiles = res.details.setdefault("pipeline_tasks", {})
        for i in range(runs):
            order = ["script", *[n for n, _v in variants]]
            if i % 2 == 1:
                order.reverse()
            for kind in order:
                work = ctx.fresh_copy(tmpl, "bench_size_total")
                try:
                    if kind == "script":
                        sr = run_runbook(cl, work, ctx.workdir, timeout=14400)
                        script.append(sr.seconds)
                        script_dump.append(sr.steps.get("pg_dump"))
                        log(f"{tag} run {i + 1}/{runs}: runbook script {sr.seconds:.2f} s "
                            f"(pg_dump {sr.steps.get('pg_dump', 0):.2f} s)")
                    else:
                        extra = dict(variants)[kind]
                        pr = ctx.pipeline("playbooks/migrate.yml", {"t1": work}, "t1", extra, timeout=14400,
                                          what=f"migrate.yml ({kind}) at {tag}")
                        totals[kind].append(pr.seconds)
                        if len(totals[kind]) == 1 and kind == "defaults" and gb > 0:
                            print(f"\n--- {tag}: where migrate.yml (role defaults) spends its time ---")
                            print(profile_table(pr.tasks) + "\n")
                            profiles[tag] = pr.tasks
                        backup_in_pipe[kind].append(pr.role_seconds("backup"))
                        log(f"{tag} run {i + 1}/{runs}: pipeline ({kind}) {pr.seconds:.2f} s "
                            f"(backup stage {pr.role_seconds('backup'):.2f} s)")
                finally:
                    cl.drop_db(work)
        s = median(script)
        res.row(f"{tag}: runbook script total (pg_dump -Fc {median(script_dump) or 0:.2f} s)", s, "s")
        for name, _v in variants:
            p = median(totals[name])
            label = f"role defaults {default_choice_label()}" if name == "defaults" else name
            res.row(f"{tag}: pipeline total, {label} (backup stage {median(backup_in_pipe[name]):.2f} s)", p, "s")
            if gb > 0:
                ratio = p / s
                res.row(f"{tag}: ratio pipeline ({name}) / script", ratio, "x", f"<= {GOAL_TOTAL:g}x",
                        ratio <= GOAL_TOTAL)
            else:
                res.row(f"{tag}: ratio pipeline ({name}) / script (empty db: see overhead)", p / s, "x")
        res.details.setdefault("totals", {})[tag] = {"script_s": script, "script_pg_dump_s": script_dump,
                                                     "pipeline_s": totals, "pipeline_backup_stage_s": backup_in_pipe}
    if not have_backup_pb:
        errors.append("playbooks/backup.yml does not exist yet: the pipeline's backup choices were not measured")
    elif not role_options("backup"):
        errors.append("roles/backup/meta/argument_specs.yml not found: the pipeline's backup choices were not measured")
    if errors:
        raise BenchError("\n".join(errors))
