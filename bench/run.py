#!/usr/bin/env python3
"""make bench: the Ansible pipeline against the runbook's own commands (issue 9).

    python bench/run.py [--sizes 0,0.2] [--runs 3] [--only overhead,size,...] [--workdir bench/.work]

Starts its own throwaway PostgreSQL 15 cluster (scripts/pgcluster.py) on a free port under
the work directory, runs the sections, prints progress, a table and the machine, and writes
bench/results.json. A section that fails prints its error and the run goes on; the exit
status is non-zero when any section failed. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context import Context, SectionResult  # noqa: E402
from lib import BENCH, BenchError, Cluster, log, machine_info  # noqa: E402
from sections import fleet, impact, ledger, money, overhead, pitr, restore, size, traffic  # noqa: E402

SECTIONS = {
    "overhead": overhead.run,
    "size": size.run,
    "restore": restore.run,
    "pitr": pitr.run,
    "traffic": traffic.run,
    "ledger": ledger.run,
    "money": money.run,
    "fleet": fleet.run,
    "impact": impact.run,
}


def cleanup(workdir: Path) -> None:
    """Remove what the sections left in the work directory (only our own names: it may be a shared path)."""
    for name in ("runs", "floor", "dumps", "traffic_migrations", "pg_pitr", "impact_migrations"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    for pattern in ("timings-*.json", "script-*"):
        for path in workdir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmarks: the pipeline against the runbook's own commands.")
    p.add_argument("--sizes", default="0,0.2",
                   help="sizes of pre-existing data in GB for the size and restore sections (default 0,0.2; "
                        "the issue's figures: 0,1.5,5)")
    p.add_argument("--runs", type=int, default=3, help="repetitions per measurement; medians are reported (default 3)")
    p.add_argument("--only", default="", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--workdir", default=str(BENCH / ".work"), help="where the cluster and scratch files go")
    p.add_argument("--results", default=str(BENCH / "results.json"), help="where to write the results")
    p.add_argument("--keep", action="store_true", help="leave the cluster and scratch files for inspection")
    p.add_argument("--traffic-seconds", type=float, default=5.0,
                   help="length of the before and after phases of the traffic section (default 5)")
    p.add_argument("--ledger-entries", type=int, default=1_000_000,
                   help="lot_entries rows in the ledger section (default 1,000,000 over 10,000 lots, 100 tenants)")
    p.add_argument("--fleet", default="1,4,8", help="fleet sizes (default 1,4,8)")
    p.add_argument("--impact-rows", type=int, default=5_000_000,
                   help="lot_entries rows in the impact section (default 5,000,000)")
    args = p.parse_args(argv)
    try:
        args.sizes = [float(s) for s in args.sizes.split(",") if s.strip() != ""]
        args.fleet = [int(s) for s in args.fleet.split(",") if s.strip() != ""]
    except ValueError:
        p.error("--sizes and --fleet take comma-separated numbers, e.g. --sizes 0,1.5,5")
    if any(s < 0 for s in args.sizes) or any(n < 1 for n in args.fleet) or args.runs < 1:
        p.error("sizes must be >= 0, fleet sizes and --runs >= 1")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def print_table(results: dict, machine: dict) -> None:
    rows = [r for res in results.values() for r in res.rows]
    header = ("section", "metric", "value", "goal", "met?")
    body = [(r.section, r.metric, r.shown(), r.goal, "" if r.met is None else ("yes" if r.met else "NO"))
            for r in rows]
    for name, res in results.items():
        if res.status == "error":
            body.append((name, "ERROR (see above)", res.error.splitlines()[0][:60] if res.error else "", "", "NO"))
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(5)]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print(line)
    prev = None
    for r in body:
        if prev is not None and r[0] != prev:
            print()
        prev = r[0]
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    print(f"machine: {machine.get('nproc')} CPUs ({machine.get('cpu', '?')}), {machine.get('memory_gb', '?')} GB RAM, "
          f"{machine.get('os', '?')}, load average at start {' '.join(machine.get('loadavg_at_start', []))}")
    print(f"         {machine.get('postgresql', '?')}")
    print(f"         {machine.get('ansible', '?')}, Python {machine.get('python')}")


def write_results(path: Path, args, machine: dict, results: dict, started: float) -> None:
    data = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "parameters": {"sizes_gb": args.sizes, "runs": args.runs, "only": args.only,
                       "traffic_seconds": args.traffic_seconds, "ledger_entries": args.ledger_entries,
                       "fleet": args.fleet, "impact_rows": args.impact_rows},
        "machine": machine,
        "sections": {name: res.as_dict() for name, res in results.items()},
        "table": [r.as_dict() for res in results.values() for r in res.rows],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _interrupted(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A SIGTERM (kill, make interrupted, a CI timeout) stops the run as Ctrl-C does, so the
    # throwaway cluster is destroyed instead of left running on its port.
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.time()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    results = {name: SectionResult(name) for name in args.only}
    machine: dict = {}
    cluster = None
    try:
        log(f"starting a throwaway PostgreSQL 15 cluster under {workdir / 'pg'}")
        cluster = Cluster(workdir / "pg")
        log(f"cluster on 127.0.0.1:{cluster.port}; sections: {', '.join(args.only)}; sizes {args.sizes} GB; "
            f"runs {args.runs}")
        machine = machine_info(cluster)
        ctx = Context(args, workdir, cluster)
        for name in args.only:
            res = results[name]
            log(f"== {name} ==")
            t = time.perf_counter()
            try:
                SECTIONS[name](ctx, res)
                res.status = "ok"
            except BenchError as exc:
                res.status, res.error = "error", str(exc)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - a bench section must not stop the others
                res.status, res.error = "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            res.seconds = time.perf_counter() - t
            if res.status == "error":
                log(f"{name}: FAILED after {res.seconds:.1f} s:\n{res.error}")
            else:
                log(f"{name}: done in {res.seconds:.1f} s")
            write_results(Path(args.results), args, machine, results, started)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BenchError as exc:
        log(f"cannot run the benchmarks: {exc}")
        return 2
    finally:
        if cluster is not None and not args.keep:
            cluster.destroy()
        if not args.keep:
            cleanup(workdir)
    print_table(results, machine)
    write_results(Path(args.results), args, machine, results, started)
    failed = [n for n, r in results.items() if r.status != "ok"]
    print(f"\nresults written to {args.results}; {len(args.only) - len(failed)}/{len(args.only)} sections ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
