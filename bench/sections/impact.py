"""7. impact: the rehearsal's impact profile (issue 14) on a big table under application traffic.

The traffic section's database (0009 applied by the pipeline) with public.lot_entries grown to
--impact-rows rows (default 5,000,000) and ANALYZEd. Four bench-only migrations, each pending
alone as 0010 of a copy of the set:
  * nullable column         ALTER TABLE ... ADD COLUMN ... text        expected: no impact (brief lock)
  * volatile default        ADD COLUMN ... DEFAULT random()            expected: impact (rewrite)
  * CREATE INDEX            plain, in a transaction                    expected: impact (SHARE for the build)
  * CREATE INDEX CONCURRENTLY  in a '-- ledger:no-transaction' file    expected: no impact
For each: the profile's verdict at the default threshold (100,000 rows) and whether it is
right; the profiling overhead, rehearsal with the profile against without it (median of
alternating pairs on one open connection as the precheck's, after one warm-up: as many pairs
as fit in about 3 s, at least --runs and at most 101, since a median of two millisecond samples
on a shared machine says little), measured twice: on the idle table, and while the traffic
section's 4 clients insert into lot_entries as arrakis_app (the issue's setting: the
rehearsal's locks then wait for the application's transactions; the rehearsal is rolled back,
the table unchanged); then, under the same inserts, the migration applied for real by the
engine: the longest application transaction during the apply (the stall it caused),
measured; then reverted with its down script (untimed).
The same overhead for the ledger's own 0010-0011 (fifty statements creating new objects, one of
them locking credit_lots) rehearsed on that database.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import time

from lib import MIGRATIONS, ROOT, BenchError, log, median, require_migrations
from sections.traffic import Workload, prepare

sys.path.insert(0, str(ROOT / ".collections"))

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine  # noqa: E402
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact_policy as policy  # noqa: E402
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice  # noqa: E402

GOAL_OVERHEAD = 1.2
THRESHOLD = 100_000
# Pairs of the overhead: as many as fit in this many seconds (at least --runs, at most MAX_PAIRS).
PAIRS_BUDGET_S = 3.0
MAX_PAIRS = 101
GROW = """
SET session_replication_role = replica;  -- bulk load: row triggers and FK checks off (consistent by construction)
INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id)
SELECT md5('lot' || (g % 1000))::uuid, md5('tenant' || ((g % 1000) % 100))::uuid, 'debit', 1,
       'grow-' || g
  FROM generate_series(1, {rows}) g;
-- Each lot's balance as the journal trigger would have moved it (a debit of 1 per new entry).
UPDATE public.credit_lot_balances b
   SET debited_micro = b.debited_micro + g.n
  FROM (SELECT md5('lot' || (g % 1000))::uuid AS lot_id, count(*) AS n FROM generate_series(1, {rows}) g
         GROUP BY 1) g
 WHERE b.lot_id = g.lot_id;
RESET session_replication_role;
"""

# name -> (up file, down file, the right verdict: an impact?)
MIGRATIONS_UNDER_TEST = {
    "nullable column": ("ALTER TABLE public.lot_entries ADD COLUMN bench_note text;\n",
                        "ALTER TABLE public.lot_entries DROP COLUMN bench_note;\n", False),
    "volatile default": ("ALTER TABLE public.lot_entries ADD COLUMN bench_rand double precision DEFAULT random();\n",
                         "ALTER TABLE public.lot_entries DROP COLUMN bench_rand;\n", True),
    "CREATE INDEX": ("CREATE INDEX lot_entries_bench_amount ON public.lot_entries (amount_micro);\n",
                     "DROP INDEX public.lot_entries_bench_amount;\n", True),
    "CREATE INDEX CONCURRENTLY": ("-- ledger:no-transaction\n"
                                  "CREATE INDEX CONCURRENTLY lot_entries_bench_amount_c"
                                  " ON public.lot_entries (amount_micro);\n",
                                  "-- ledger:no-transaction\nDROP INDEX CONCURRENTLY public.lot_entries_bench_amount_c;\n",
                                  False),
}


def migration_set(workdir, name, up, down):
    """0008, 0009 and the migration under test as 0010 (its own directory)."""
    d = workdir / "impact_migrations" / "".join(c if c.isalnum() else "_" for c in name.lower())
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for path in sorted(MIGRATIONS.glob("000[89]_*.sql")):
        shutil.copy2(path, d / path.name)
    (d / "0010_bench_impact.sql").write_text(up)
    (d / "0010_bench_impact.down.sql").write_text(down)
    return engine.load_migration_set(str(d))


def rehearse_seconds(conn, pending, profile):
    """One rehearsal on an open connection, as the precheck runs it (its catalog caches warm)."""
    t = time.perf_counter()
    results = engine.rehearse(None, pending, profile=profile, lock_timeout="10s", statement_timeout="0", conn=conn)
    took = time.perf_counter() - t
    if any(r["status"] != "would_apply" for r in results):
        raise BenchError(f"impact: the rehearsal did not pass: {engine.format_rehearsal(results)}")
    return took, results


def overhead_pairs(ctx, conn, pending):
    """Medians of the rehearsal with and without the profile (alternating pairs after a warm-up) and its results."""
    first, _ = rehearse_seconds(conn, pending, True)  # warm-up, not counted (the precheck's connection is warm)
    rehearse_seconds(conn, pending, False)
    pairs = max(ctx.args.runs, min(MAX_PAIRS, int(PAIRS_BUDGET_S / (2 * first))))
    with_, without, results = [], [], None
    for _ in range(pairs):
        without.append(rehearse_seconds(conn, pending, False)[0])
        took, results = rehearse_seconds(conn, pending, True)
        with_.append(took)
    return with_, without, results


def overhead_pairs_apart(ctx, connect, pending):
    """overhead_pairs in a forked child on a connection of its own.

    The Workload's client threads live in this process: sharing its interpreter lock with them
    would charge the profile's Python work with their waits (measured: twice the profile's
    cost). The child gets no threads (fork copies only the calling one) and leaves through
    os._exit, so the connections it inherited are never closed from it.
    """
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)

    def child():
        conn = connect()
        try:
            with_, without, _results = overhead_pairs(ctx, conn, pending)
            send.send((with_, without, None))
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            send.send((None, None, f"{type(exc).__name__}: {exc}"))
        finally:
            conn.close()

    proc = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    proc.start()
    send.close()
    try:
        with_, without, error = receive.recv()
    except EOFError:
        with_, without, error = None, None, f"the child died (exit code {proc.exitcode})"
    proc.join()
    if error:
        raise BenchError(f"impact: the rehearsal pairs under the inserts failed: {error}")
    return with_, without


def overhead_row(res, label, with_, without):
    ratio = median(with_) / median(without) if median(without) else None
    res.row(f"{label}: rehearsal with profile / without ({fmt_s(median(with_))} / {fmt_s(median(without))},"
            f" {len(with_)} pairs)", ratio, "x", f"<= {GOAL_OVERHEAD}x", ratio is not None and ratio <= GOAL_OVERHEAD)
    return ratio


def fmt_s(seconds):
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run(ctx, res):
    require_migrations("0008", "0009")
    cl = ctx.cluster
    rows = ctx.args.impact_rows
    base = prepare(ctx, ctx.workdir / "traffic_migrations")
    url = cl.url(base)
    advice = PlaybookAdvice("bench")
    try:
        log(f"impact: growing lot_entries to {rows:,} rows (untimed setup)")
        t = time.perf_counter()
        cl.execute(base, GROW.format(rows=max(rows - 100_000, 0)))
        cl.execute(base, "VACUUM (ANALYZE) public.lot_entries")
        reltuples = cl.query(base, "SELECT reltuples::bigint, pg_total_relation_size('public.lot_entries')"
                                   " FROM pg_class WHERE oid = 'public.lot_entries'::regclass")[0]
        res.details["table"] = {"reltuples": reltuples[0], "total_bytes": reltuples[1],
                                "setup_s": round(time.perf_counter() - t, 1)}
        log(f"impact: lot_entries {reltuples[0]:,} rows, {reltuples[1] / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        total_with = total_without = total_busy_with = total_busy_without = 0.0
        for name, (up, down, expected) in MIGRATIONS_UNDER_TEST.items():
            migrations = migration_set(ctx.workdir, name, up, down)
            pending = [m for m in migrations if m.version == "0010"]
            conn = cl.connect(base)
            phase = min(ctx.args.traffic_seconds, 2.0)
            try:
                with_, without, results = overhead_pairs(ctx, conn, pending)
                found = policy.impacts(results, THRESHOLD)
                verdict = bool(found)
                total_with += median(with_)
                total_without += median(without)
                # The setting: the same pairs while the application inserts into the table
                # (the rehearsal's locks wait for its transactions, as on a live target); then the
                # migration applied for real under those inserts, the longest transaction being the stall.
                with Workload(cl.url(base, "arrakis_app"),
                              "impact-" + "".join(c for c in name.lower() if c.isalnum())) as wl:
                    time.sleep(phase)
                    busy_with, busy_without = overhead_pairs_apart(ctx, lambda: cl.connect(base), pending)
                    total_busy_with += median(busy_with)
                    total_busy_without += median(busy_without)
                    ta0 = time.monotonic()
                    engine.apply(url, migrations, target="0010", run_id="bench-impact", advice=advice,
                                 lock_timeout="10s", statement_timeout="0", lock_retries=3)
                    ta1 = time.monotonic()
                    time.sleep(phase)
            finally:
                conn.close()
            engine.revert(url, migrations, "0009", run_id="bench-impact", advice=advice)
            if wl.failures:
                raise BenchError(f"impact ({name}): the workload failed: {'; '.join(wl.failures)}")
            during = [r for r in wl.all() if r[2] is None and r[1] >= ta0 and r[0] <= ta1]
            stall = max((r[1] - r[0] for r in during), default=None)
            errors = sum(1 for r in wl.all() if r[2] is not None)
            if errors or not during:
                # None of these migrations makes an insert fail: a failing workload measures no stall.
                codes = sorted(set(r[2] for r in wl.all() if r[2] is not None))
                raise BenchError(f"impact ({name}): {errors} application transactions failed (SQLSTATE "
                                 f"{', '.join(codes) or '-'}), {len(during)} committed during the apply: no stall measured")
            res.row(f"impact ({name}): verdict (expected {'impact' if expected else 'no impact'})",
                    "impact" if verdict else "no impact", "", "right", verdict == expected)
            res.row(f"impact ({name}): longest application stall while applying ({ta1 - ta0:.1f} s apply)",
                    stall, "s")
            ratio = overhead_row(res, f"impact ({name}), idle", with_, without)
            busy = overhead_row(res, f"impact ({name}), under the application's inserts", busy_with, busy_without)
            res.details[name] = {"impacts": found, "profile": results[-1].get("impact"), "with_s": with_,
                                 "without_s": without, "busy_with_s": busy_with, "busy_without_s": busy_without,
                                 "apply_s": ta1 - ta0, "stall_s": stall,
                                 "failed_app_tx": errors, "committed_during_apply": len(during)}
            log(f"impact ({name}): verdict {'impact' if verdict else 'no impact'} (expected "
                f"{'impact' if expected else 'no impact'}); stall {stall or 0:.3f} s over a {ta1 - ta0:.2f} s apply; "
                f"rehearsal {fmt_s(median(with_))} with profile, {fmt_s(median(without))} without ({ratio or 0:.2f}x,"
                f" {len(with_)} pairs); under the inserts {fmt_s(median(busy_with))} / {fmt_s(median(busy_without))}"
                f" ({busy or 0:.2f}x, {len(busy_with)} pairs); "
                f"{errors} failed application transactions")
        overall = total_with / total_without if total_without else None
        res.row("impact: all four rehearsals, with profile / without, idle", overall, "x", f"<= {GOAL_OVERHEAD}x",
                overall is not None and overall <= GOAL_OVERHEAD)
        overall = total_busy_with / total_busy_without if total_busy_without else None
        res.row("impact: all four rehearsals, with profile / without, under the application's inserts", overall, "x",
                f"<= {GOAL_OVERHEAD}x", overall is not None and overall <= GOAL_OVERHEAD)
        # The ledger's own set: many statements, nearly all creating new objects.
        own = [m for m in engine.load_migration_set(str(MIGRATIONS)) if m.version in ("0010", "0011")]
        conn = cl.connect(base)
        try:
            with_, without, _results = overhead_pairs(ctx, conn, own)
        finally:
            conn.close()
        ratio = overhead_row(res, "impact (the ledger's 0010-0011)", with_, without)
        res.details["ledger 0010-0011"] = {"with_s": with_, "without_s": without}
        log(f"impact (the ledger's 0010-0011): rehearsal {fmt_s(median(with_))} with profile, "
            f"{fmt_s(median(without))} without ({ratio or 0:.2f}x, {len(with_)} pairs)")
    finally:
        cl.drop_db(base)
        shutil.rmtree(ctx.workdir / "impact_migrations", ignore_errors=True)
