"""6. fleet: wall time of the whole pipeline for 1, 4 and 8 targets.

N empty databases in the benchmark cluster, a user inventory whose hosts set only
database_url (groups fleet_1, fleet_4, fleet_8), `-l fleet_N`, fresh databases for every
run. The pipeline's rollout policy applies as configured (canary first, then batches of
migrate_batch_size in parallel within a batch, forks from ansible.cfg); the biggest fleet
also runs with migrate_batch_size=100% (the canary, then every other target at once).
"""

from __future__ import annotations

import shutil

from lib import log, median, write_inventory


def run(ctx, res):
    cl, runs = ctx.cluster, ctx.args.runs
    sizes = ctx.args.fleet
    biggest = max(sizes)
    hosts = {f"target{i:02d}": f"bench_fleet_{i:02d}" for i in range(1, biggest + 1)}
    names = list(hosts)
    run_dir = ctx.run_dir("fleet")
    groups = {f"fleet_{n}": {h: cl.url(hosts[h]) for h in names[:n]} for n in sizes}
    inventory = write_inventory(run_dir / "inventory.yml", groups)
    one_target = None
    # The configured rollout for every size; for the biggest fleet also one batch after the canary.
    plans = [(n, None) for n in sizes]
    if biggest > 1:
        plans.append((biggest, "100%"))
    try:
        for n, batch_size in plans:
            walls, per_host = [], []
            label = f"{n} target(s)" + (f", migrate_batch_size={batch_size}" if batch_size else "")
            for i in range(runs):
                for h in names[:n]:
                    cl.create_db(hosts[h])
                out = run_dir / f"out-{n}-{i}"
                extra = {"backup_dir": str(out / "backups"), "report_dir": str(out / "reports")}
                if batch_size:
                    extra["migrate_batch_size"] = batch_size
                pr = ctx.ansible.playbook("playbooks/migrate.yml", inventory, f"fleet_{n}", extra,
                                          timeout=3600, what=f"migrate.yml -l fleet_{n}")
                shutil.rmtree(out, ignore_errors=True)
                walls.append(pr.seconds)
                names_seen = [p["name"] for p in pr.plays]
                batches = max((names_seen.count(x) for x in set(names_seen)), default=0)
                spans = {}
                for t in pr.tasks:
                    a, b = spans.get(t["host"], (t["start"], t["end"]))
                    spans[t["host"]] = (min(a, t["start"]), max(b, t["end"]))
                per_host.append(median([b - a for a, b in spans.values()]))
                log(f"fleet {label}, run {i + 1}/{runs}: {pr.seconds:.2f} s in {batches} batch(es) "
                    f"(median span of one target's tasks {per_host[-1]:.2f} s)")
            wall = median(walls)
            if n == 1:
                one_target = wall
            res.row(f"{label}: wall time (median of {runs}; {batches} batches)", wall, "s")
            if one_target and n > 1:
                res.row(f"{label}: wall time / 1 target", wall / one_target, "x")
            res.details[label] = {"wall_s": walls, "median_target_span_s": per_host, "batches": batches}
    finally:
        for db in hosts.values():
            cl.drop_db(db)
        shutil.rmtree(run_dir, ignore_errors=True)
