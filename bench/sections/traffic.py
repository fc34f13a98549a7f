"""4. traffic: the application's writes while the pipeline migrates the same database.

The database is at 0009 (migrated by the pipeline with migrate_target=0009) and holds
1,000 lots and 100,000 entries; 0010, 0011 and a bench-only 0012 that adds a column to
lot_entries (it needs lot_entries' ACCESS EXCLUSIVE lock, briefly) are pending, in a
copy of the migration set under the work directory (migrations_dir).

Four client threads run the application's transaction as arrakis_app, as fast as they can:
    BEGIN; SELECT app.set_community_context($tenant); INSERT INTO lot_entries ...; COMMIT
for --traffic-seconds before the pipeline starts, during the whole pipeline, and for
--traffic-seconds after it. Every transaction's start and end are kept: throughput and
p50/p99 latency per phase, the longest transaction (the longest stall a client saw;
goal: no longer than the migrate role's lock timeout) and the longest time in which no
client committed anything.

Three scenarios: `free` (only the workload); `contended`: a long reader holds a
lot_entries lock (ACCESS SHARE, as a long report query does) from the pipeline's start
until it sees the pipeline waiting for the table's ACCESS EXCLUSIVE lock, and then for the
lock timeout plus one second more (twice). Application inserts queue behind the waiting
ALTER; with lock_timeout the pipeline gives up after the timeout and the queue drains.
The first to wait is usually the precheck's rehearsal of 0012, which may refuse the run
(nothing changed) rather than retry: the outcome is reported, not required. `contended,
no rehearsal` (-e precheck_rehearse=false) makes the migrate stage itself meet the lock:
its engine must retry with back-off and complete.
"""

from __future__ import annotations

import random
import shutil
import threading
import time

import psycopg2

from lib import (MIGRATIONS, BenchError, failure_excerpt, lock_timeout_seconds, log, percentile,
                 require_migrations)
from sections.ledger import lot_uuid, tenant_uuid

CLIENTS = 4
LOTS = 1000
TENANTS = 100
SLACK = 1.10  # a stall may exceed the lock timeout by 10% (scheduling on a shared 2-core machine)

MIGRATION_0012 = """-- Bench only (bench/sections/traffic.py): a migration that needs lot_entries' ACCESS EXCLUSIVE
-- lock while the application inserts into the table. Adding a nullable column without a
-- default changes only the catalog: the lock is held for milliseconds once granted.
ALTER TABLE public.lot_entries ADD COLUMN bench_note text;
"""
MIGRATION_0012_DOWN = "ALTER TABLE public.lot_entries DROP COLUMN bench_note;\n"

SEED = """
SET session_replication_role = replica;
INSERT INTO public.credit_lots (id, community_id, source, amount_micro, created_at)
SELECT md5('lot' || n)::uuid, md5('tenant' || (n % {tenants}))::uuid, 'purchase', 1000000000000,
       timestamptz '2024-01-01' + n * interval '1 minute'
  FROM generate_series(0, {lots} - 1) n;
INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id)
SELECT md5('lot' || l)::uuid, md5('tenant' || (l % {tenants}))::uuid,
       CASE WHEN e = 0 THEN 'credit' ELSE 'debit' END, CASE WHEN e = 0 THEN 1000000000000 ELSE 1000 END,
       CASE WHEN e = 0 THEN NULL ELSE 'seed-' || l || '-' || e END
  FROM generate_series(0, 99) e, generate_series(0, {lots} - 1) l;
-- The balance rows the journal trigger would have maintained (one credit, 99 debits of 1000 a lot):
-- without them every application debit is refused (the lot has no balance row).
INSERT INTO public.credit_lot_balances (lot_id, community_id, amount_micro, credit_micro, debited_micro)
SELECT l.id, l.community_id, l.amount_micro, 1000000000000, 99 * 1000
  FROM public.credit_lots l;
RESET session_replication_role;
"""

INSERT = ("INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id) "
          "VALUES (%s, %s, 'debit', 1, %s)")


class Workload:
    """CLIENTS threads running the application's transaction; every (start, end, sqlstate) is kept."""

    def __init__(self, url: str, tag: str):
        self.url = url
        self.tag = tag
        self.stop = threading.Event()
        self.records: list = [[] for _ in range(CLIENTS)]
        self.failures: list = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, idx: int) -> None:
        rng = random.Random(idx)
        out = self.records[idx]
        conn = None
        k = 0
        try:
            while not self.stop.is_set():
                if conn is None:
                    conn = psycopg2.connect(self.url, application_name=f"bench-app-{idx}")
                n = rng.randrange(LOTS)
                tenant, lot = tenant_uuid(n % TENANTS), lot_uuid(n)
                k += 1
                start = time.monotonic()
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT app.set_community_context(%s)", (tenant,))
                        cur.execute(INSERT, (lot, tenant, f"{self.tag}-{idx}-{k}"))
                    conn.commit()
                    out.append((start, time.monotonic(), None))
                except psycopg2.Error as exc:
                    out.append((start, time.monotonic(), exc.pgcode or "connection"))
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        conn.close()
                        conn = None
                    time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001 - reported by the section
            self.failures.append(f"client {idx}: {exc}")
        finally:
            if conn is not None:
                conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def all(self) -> list:
        return sorted((r for recs in self.records for r in recs), key=lambda r: r[1])


class LongReader(threading.Thread):
    """Holds ACCESS SHARE on lot_entries until the pipeline has waited `hold_after_wait` seconds for it.

    Up to `episodes` times: hold; when a session is seen waiting for ACCESS EXCLUSIVE on the
    table, keep holding for `hold_after_wait` seconds; release; take the lock again 0.3 s
    later for the next episode. With two episodes, the precheck's rehearsal and the migrate
    stage each meet the lock (usually): every lock wait of the pipeline is exercised.
    """

    def __init__(self, admin_url: str, hold_after_wait: float, episodes: int = 2):
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.hold_after_wait = hold_after_wait
        self.episodes = episodes
        self.stop = threading.Event()
        self.log: list = []  # per episode: held_from, saw_wait (monotonic, epoch), released
        self.error = None

    def run(self) -> None:
        try:
            holder = psycopg2.connect(self.admin_url, application_name="bench-long-reader")
            monitor = psycopg2.connect(self.admin_url, application_name="bench-lock-monitor")
            monitor.autocommit = True
            with holder.cursor() as cur, monitor.cursor() as mon:
                for _ in range(self.episodes):
                    if self.stop.is_set():
                        break
                    cur.execute("SELECT count(*) FROM (SELECT 1 FROM public.lot_entries LIMIT 1) s")
                    ep = {"held_from": time.monotonic(), "saw_wait": None, "saw_wait_epoch": None, "released": None}
                    self.log.append(ep)
                    while not self.stop.is_set():
                        now = time.monotonic()
                        if ep["saw_wait"] is None:
                            mon.execute("SELECT count(*) FROM pg_locks WHERE relation = 'public.lot_entries'::regclass "
                                        "AND NOT granted AND mode = 'AccessExclusiveLock'")
                            if mon.fetchone()[0]:
                                ep["saw_wait"], ep["saw_wait_epoch"] = now, time.time()
                        elif now - ep["saw_wait"] >= self.hold_after_wait:
                            break
                        time.sleep(0.02)
                    holder.commit()
                    ep["released"] = time.monotonic()
                    self.stop.wait(0.3)
            holder.close()
            monitor.close()
        except Exception as exc:  # noqa: BLE001
            self.error = str(exc)


def phase_stats(records: list, lo: float, hi: float) -> dict:
    ended = [r for r in records if lo <= r[1] < hi and r[2] is None]
    started = [r for r in records if lo <= r[0] < hi and r[2] is None]
    lat = [(r[1] - r[0]) * 1000 for r in started]
    return {"seconds": round(hi - lo, 2), "committed": len(ended), "tps": len(ended) / (hi - lo) if hi > lo else None,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else None,
            "errors": sum(1 for r in records if lo <= r[1] < hi and r[2] is not None)}


def longest_gap(records: list, lo: float, hi: float) -> tuple[float, float]:
    """Longest time (s) within [lo, hi] in which no client committed anything, and when it began."""
    ends = [lo] + [r[1] for r in records if lo <= r[1] <= hi and r[2] is None] + [hi]
    best, at = 0.0, lo
    for a, b in zip(ends, ends[1:]):
        if b - a > best:
            best, at = b - a, a
    return best, at


def prepare(ctx, mig_dir) -> str:
    """A template database at 0009 (migrated by the pipeline) with 1,000 lots and 100,000 entries."""
    cl = ctx.cluster
    shutil.rmtree(mig_dir, ignore_errors=True)
    mig_dir.mkdir(parents=True)
    for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        if path.name[:4] <= "0011":
            shutil.copy2(path, mig_dir / path.name)
    (mig_dir / "0012_bench_lot_entries_note.sql").write_text(MIGRATION_0012)
    (mig_dir / "0012_bench_lot_entries_note.down.sql").write_text(MIGRATION_0012_DOWN)
    base = cl.create_db("bench_traffic_base")
    log("traffic: migrating the base database to 0009 with the pipeline (untimed setup)")
    ctx.pipeline("playbooks/migrate.yml", {"t1": base}, "t1",
                 {"migrations_dir": str(mig_dir), "migrate_target": "0009"}, what="migrate.yml to 0009 (setup)")
    cl.execute(base, SEED.format(tenants=TENANTS, lots=LOTS))
    cl.execute(base, "VACUUM (ANALYZE) public.credit_lots, public.lot_entries, public.credit_lot_balances")
    return base


# name -> (a long reader contends for lot_entries?, extra variables, must the pipeline complete?)
SCENARIOS = {
    "free": (False, {}, True),
    # The whole pipeline as configured: the first lock wait is usually the precheck's rehearsal of 0012,
    # which may refuse the run (nothing changed) rather than retry; either outcome is reported.
    "contended": (True, {}, False),
    # Without the rehearsal the migrate stage itself meets the lock: its engine must retry and complete.
    "contended, no rehearsal": (True, {"precheck_rehearse": False}, True),
}


def scenario(ctx, res, base: str, mig_dir, name: str, lock_timeout: float) -> None:
    contended, extra, must_complete = SCENARIOS[name]
    cl = ctx.cluster
    phase = ctx.args.traffic_seconds
    db = ctx.fresh_copy(base, "bench_traffic_" + "".join(c if c.isalnum() else "_" for c in name))
    pr = reader = None
    try:
        log(f"traffic ({name}): {CLIENTS} clients; {phase:g} s before, the pipeline, {phase:g} s after")
        with Workload(cl.url(db, "arrakis_app"), name.replace(" ", "").replace(",", "-")) as wl:
            t0 = time.monotonic()
            time.sleep(phase)
            tp0 = time.monotonic()
            if contended:
                reader = LongReader(cl.url(db), lock_timeout + 1.0)
                reader.start()
            pr = ctx.pipeline("playbooks/migrate.yml", {"t1": db}, "t1", {"migrations_dir": str(mig_dir), **extra},
                              timeout=1800, check=False)
            tp1 = time.monotonic()
            if reader is not None:
                reader.stop.set()
                reader.join(10)
            time.sleep(phase)
            t1 = time.monotonic()
        applied = cl.query(db, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history")[0][0]
    finally:
        cl.drop_db(db)
    if wl.failures:
        raise BenchError(f"traffic ({name}): the workload failed: {'; '.join(wl.failures)}")
    recs = wl.all()
    phases = {"before": phase_stats(recs, t0, tp0), "during": phase_stats(recs, tp0, tp1),
              "after": phase_stats(recs, tp1, t1)}
    ok = [r for r in recs if r[2] is None]
    worst = max(ok, key=lambda r: r[1] - r[0]) if ok else None
    stall = (worst[1] - worst[0]) if worst else None
    gap, gap_at = longest_gap(recs, tp0, t1)
    tag = f"traffic ({name})"
    for ph, st in phases.items():
        res.row(f"{tag}: throughput {ph} ({st['seconds']:.1f} s)", st["tps"], "tx/s")
    for ph, st in phases.items():
        res.row(f"{tag}: p99 latency {ph}", st["p99_ms"], "ms")
    res.row(f"{tag}: longest transaction (stall) at +{(worst[0] - tp0) if worst else 0:.1f} s",
            stall, "s", f"<= lock timeout {lock_timeout:g} s", stall is not None and stall <= lock_timeout * SLACK)
    res.row(f"{tag}: longest time without any commit", gap, "s")
    errors = sum(st["errors"] for st in phases.values())
    res.row(f"{tag}: failed application transactions", errors, "tx")
    detail = {"phases": phases, "max_latency_s": stall, "longest_gap_s": gap, "gap_at_s": gap_at - tp0,
              "pipeline_rc": pr.rc, "pipeline_s": pr.seconds, "applied_after": applied,
              "error_codes": sorted({r[2] for r in recs if r[2]})}
    if reader is not None:
        episodes = []
        for ep in reader.log:
            task = pr.task_at(ep["saw_wait_epoch"]) if ep["saw_wait_epoch"] else None
            episodes.append({"held_from_s": ep["held_from"] - tp0,
                             "saw_wait_at_s": (ep["saw_wait"] - tp0) if ep["saw_wait"] else None,
                             "released_at_s": (ep["released"] - tp0) if ep["released"] else None,
                             "pipeline_task_waiting": task})
        detail["reader"] = {"episodes": episodes, "error": reader.error}
        waits = [e for e in episodes if e["saw_wait_at_s"] is not None]
        stages = ", ".join(f"{(e['pipeline_task_waiting'] or '?').split(' : ')[0]} at +{e['saw_wait_at_s']:.1f} s"
                           for e in waits) or "none seen"
        res.row(f"{tag}: lock waits of the pipeline behind the reader ({stages})", len(waits), "waits")
    res.details[name] = detail
    log(f"{tag}: " + "; ".join(f"{ph} {st['tps'] or 0:,.0f} tx/s p99 {st['p99_ms'] or 0:.1f} ms"
                              for ph, st in phases.items())
        + f"; longest stall {stall or 0:.2f} s; no commit for {gap:.2f} s; pipeline rc {pr.rc} in {pr.seconds:.1f} s"
        + (f"; reader: {detail['reader']}" if reader is not None else ""))
    lock_refusal = pr.rc != 0 and ("55P03" in pr.out or "lock_timeout" in pr.out) and applied == "0008,0009"
    if pr.rc == 0:
        outcome = f"completed, applied {applied}"
    elif lock_refusal:
        outcome = "refused on a lock timeout, nothing changed"
    else:
        outcome = f"FAILED (exit {pr.rc}), history {applied}"
    res.row(f"{tag}: pipeline outcome", outcome, "", "completes" if must_complete else "",
            (pr.rc == 0) if must_complete else None)
    detail["outcome"] = outcome
    if pr.rc != 0 and (must_complete or not lock_refusal):
        raise BenchError(f"{tag}: the pipeline failed under traffic (exit {pr.rc}):\n{failure_excerpt(pr.out)}")
    if pr.rc == 0 and (applied is None or "0012" not in applied):
        raise BenchError(f"{tag}: the pipeline ended but 0012 is not applied (history: {applied})")


def run(ctx, res):
    require_migrations("0008", "0009", "0010", "0011")
    lock_timeout, source = lock_timeout_seconds()
    res.details["lock_timeout"] = {"seconds": lock_timeout, "from": source}
    mig_dir = ctx.workdir / "traffic_migrations"
    base = prepare(ctx, mig_dir)
    errors = []
    try:
        for name in SCENARIOS:
            try:
                scenario(ctx, res, base, mig_dir, name, lock_timeout)
            except BenchError as exc:
                errors.append(str(exc))
                log(str(exc))
    finally:
        ctx.cluster.drop_db(base)
    if errors:
        raise BenchError("\n".join(errors))
