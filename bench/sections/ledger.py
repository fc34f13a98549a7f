"""5. ledger: the application's queries on a populated ledger, and the cost of the guarantees.

A database with 0008-0011 applied (plain psql -1 -f, the pipeline is not measured here)
and, generated server-side, 10,000 lots over 100 tenants and --ledger-entries journal
entries (default 1,000,000: a credit and 99 debits per lot, interleaved over time).
As arrakis_app, with its tenant context, RLS applying:
  * one lot's balance through lot_balances: client round trip, median of 500 lots
    (goal < 1 ms), and the server's execution time from EXPLAIN ANALYZE;
  * a tenant's 20 newest lots with their balances, and the tenant's total balance;
  * the insert rate into lot_entries (RLS WITH CHECK, tenant-agreeing foreign key,
    append-only triggers, the balance trigger) against the same inserts into bench_plain.lot_entries, a copy
    made with LIKE ... INCLUDING ALL (same columns, checks and indexes; no RLS, triggers
    or foreign key), in application-shaped transactions (BEGIN; set context; INSERT;
    COMMIT) and in bulk (one INSERT ... SELECT of 20,000 rows); goal overhead <= 1.3x.
The EXPLAIN (ANALYZE, BUFFERS) plans are printed and kept in results.json.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
import uuid

from lib import MIGRATIONS, apply_files, log, median, percentile, require_migrations, up_files

LOTS = 10_000
TENANTS = 100
GOAL_BALANCE_MS = 1.0
GOAL_OVERHEAD = 1.3
SINGLE_ROWS = 3000   # per table and run, in alternating blocks of SINGLE_BLOCK
SINGLE_BLOCK = 100
BULK_ROWS = 20_000
BULK_STATEMENTS = 4  # per table and run
# Bulk inserts also into the plain copy plus only the FK, or only RLS: where the overhead comes from.
BULK_VARIANTS = ["public.lot_entries", "bench_plain.lot_entries", "bench_plain.lot_entries_fk",
                 "bench_plain.lot_entries_rls"]


def md5_uuid(text: str) -> str:
    return str(uuid.UUID(hashlib.md5(text.encode()).hexdigest()))


def lot_uuid(n: int) -> str:
    return md5_uuid(f"lot{n}")


def tenant_uuid(t: int) -> str:
    return md5_uuid(f"tenant{t}")


SEED = """
SET session_replication_role = replica;  -- bulk load: row triggers and FK checks off (consistent by construction)
INSERT INTO public.credit_lots (id, community_id, source, amount_micro, created_at)
SELECT md5('lot' || n)::uuid, md5('tenant' || (n % {tenants}))::uuid, 'purchase', 1000000000000,
       timestamptz '2024-01-01' + n * interval '1 minute'
  FROM generate_series(0, {lots} - 1) n;
INSERT INTO public.lot_entries (lot_id, community_id, entry_type, amount_micro, reservation_id, created_at)
SELECT md5('lot' || l)::uuid, md5('tenant' || (l % {tenants}))::uuid,
       CASE WHEN e = 0 THEN 'credit' ELSE 'debit' END,
       CASE WHEN e = 0 THEN 1000000000000 ELSE 1000 END,
       CASE WHEN e = 0 THEN NULL ELSE 'r-' || l || '-' || e END,
       timestamptz '2024-01-01' + (e * {lots} + l) * interval '1 second'
  FROM generate_series(0, {per_lot} - 1) e, generate_series(0, {lots} - 1) l;
-- The balance rows the journal trigger would have maintained.
INSERT INTO public.credit_lot_balances (lot_id, community_id, amount_micro, credit_micro, debited_micro)
SELECT l.id, l.community_id, l.amount_micro, 1000000000000, ({per_lot} - 1) * 1000
  FROM public.credit_lots l;
RESET session_replication_role;
CREATE SCHEMA bench_plain;
CREATE TABLE bench_plain.lot_entries (LIKE public.lot_entries INCLUDING ALL);
INSERT INTO bench_plain.lot_entries SELECT * FROM public.lot_entries;
-- The breakdown: the plain copy plus only the foreign key, or only the RLS policies.
CREATE TABLE bench_plain.lot_entries_fk (LIKE public.lot_entries INCLUDING ALL);
CREATE TABLE bench_plain.lot_entries_rls (LIKE public.lot_entries INCLUDING ALL);
DO $copy$
DECLARE r record;
BEGIN
    FOR r IN SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint
              WHERE conrelid = 'public.lot_entries'::regclass AND contype = 'f' LOOP
        EXECUTE format('ALTER TABLE bench_plain.lot_entries_fk ADD %s', r.def);
    END LOOP;
    FOR r IN SELECT policyname, cmd, qual, with_check FROM pg_policies
              WHERE schemaname = 'public' AND tablename = 'lot_entries' LOOP
        EXECUTE format('CREATE POLICY %I ON bench_plain.lot_entries_rls FOR %s%s%s', r.policyname, r.cmd,
                       CASE WHEN r.qual IS NOT NULL THEN ' USING (' || r.qual || ')' ELSE '' END,
                       CASE WHEN r.with_check IS NOT NULL THEN ' WITH CHECK (' || r.with_check || ')' ELSE '' END);
    END LOOP;
END
$copy$;
ALTER TABLE bench_plain.lot_entries_rls ENABLE ROW LEVEL SECURITY;
ALTER TABLE bench_plain.lot_entries_rls FORCE ROW LEVEL SECURITY;
INSERT INTO bench_plain.lot_entries_fk SELECT * FROM public.lot_entries;
INSERT INTO bench_plain.lot_entries_rls SELECT * FROM public.lot_entries;
GRANT USAGE ON SCHEMA bench_plain TO arrakis_app;
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA bench_plain TO arrakis_app;
"""

INSERT_ONE = ("INSERT INTO {table} (lot_id, community_id, entry_type, amount_micro, reservation_id) "
              "VALUES (%s, %s, 'debit', 1, %s)")
INSERT_BULK = ("INSERT INTO {table} (lot_id, community_id, entry_type, amount_micro, reservation_id) "
               "SELECT md5('lot' || ({t} + {tenants} * (g % ({lots} / {tenants}))))::uuid, '{tuuid}', 'debit', 1, "
               "'{tag}-' || g FROM generate_series(1, {rows}) g")


def seed(ctx, db: str, entries: int) -> dict:
    cl = ctx.cluster
    per_lot = max(1, entries // LOTS)
    t = time.perf_counter()
    conn = cl.connect(db)
    with conn.cursor() as cur:
        cur.execute(SEED.format(tenants=TENANTS, lots=LOTS, per_lot=per_lot))
        cur.execute("VACUUM (ANALYZE) public.credit_lots, public.lot_entries, public.credit_lot_balances, "
                    "bench_plain.lot_entries, "
                    "bench_plain.lot_entries_fk, bench_plain.lot_entries_rls")
        cur.execute("SELECT count(*), pg_total_relation_size('public.lot_entries') FROM public.lot_entries")
        count, size = cur.fetchone()
    conn.close()
    return {"lots": LOTS, "tenants": TENANTS, "entries": count, "lot_entries_bytes": size,
            "seconds": round(time.perf_counter() - t, 1)}


def explain(cur, sql: str, params=None) -> tuple[str, float]:
    """EXPLAIN (ANALYZE, BUFFERS) text and its execution time in ms (the statement runs once)."""
    cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
    text = "\n".join(r[0] for r in cur.fetchall())
    m = re.search(r"Execution Time: ([0-9.]+) ms", text)
    return text, float(m.group(1)) if m else float("nan")


def timed_queries(conn, sql: str, tenants_lots: list, n: int) -> list:
    """Client-side round trip (ms) of `sql` in the tenant's transaction, one sample per (tenant, lot)."""
    out = []
    with conn.cursor() as cur:
        for tenant, lot in tenants_lots[:n]:
            cur.execute("SELECT app.set_community_context(%s)", (tenant,))
            t = time.perf_counter()
            cur.execute(sql, {"lot": lot})
            cur.fetchall()
            out.append((time.perf_counter() - t) * 1000)
            conn.commit()
    return out


def run(ctx, res):
    require_migrations("0008", "0009")
    cl, runs = ctx.cluster, ctx.args.runs
    db = cl.create_db("bench_ledger")
    apply_files(cl.url(db), up_files(MIGRATIONS, "0011"), cl.bin("psql"))
    log(f"seeding {LOTS:,} lots over {TENANTS} tenants and {ctx.args.ledger_entries:,} lot_entries (server-side)")
    info = seed(ctx, db, ctx.args.ledger_entries)
    log(f"  {info['entries']:,} entries ({info['lot_entries_bytes'] / 2**20:.0f} MB with indexes) "
        f"in {info['seconds']:.1f} s")
    res.details["data"] = info
    res.row("lot_entries rows (over 10k lots, 100 tenants)", info["entries"], "rows")
    plans = {}
    rng = random.Random(9)
    sample = [(tenant_uuid(n % TENANTS), lot_uuid(n)) for n in (rng.randrange(LOTS) for _ in range(500))]

    conn = cl.connect(db, user="arrakis_app", autocommit=False)
    try:
        # Warm the caches once (both sides of every comparison run warm).
        timed_queries(conn, "SELECT * FROM lot_balances WHERE lot_id = %(lot)s", sample, 100)

        balance = timed_queries(conn, "SELECT * FROM lot_balances WHERE lot_id = %(lot)s", sample, len(sample))
        with conn.cursor() as cur:
            server = []
            for tenant, lot in sample[:20]:
                cur.execute("SELECT app.set_community_context(%s)", (tenant,))
                text, ms = explain(cur, "SELECT * FROM lot_balances WHERE lot_id = %s", (lot,))
                server.append(ms)
                conn.commit()
            plans["one lot's balance"] = text
        b = median(balance)
        res.row(f"one lot's balance via lot_balances, client round trip (median of {len(balance)})", b, "ms",
                f"< {GOAL_BALANCE_MS:g} ms", b < GOAL_BALANCE_MS)
        res.row("one lot's balance, p95 round trip", percentile(balance, 95), "ms")
        res.row("one lot's balance, server execution (EXPLAIN ANALYZE, median of 20)", median(server), "ms")
        log(f"one lot's balance: median {b:.3f} ms, p95 {percentile(balance, 95):.3f} ms, "
            f"server {median(server):.3f} ms")

        newest = timed_queries(conn, "SELECT lot_id, remaining_micro, created_at FROM lot_balances "
                                     "ORDER BY created_at DESC LIMIT 20", sample, 100)
        total = timed_queries(conn, "SELECT count(*), sum(remaining_micro) FROM lot_balances", sample, 30)
        with conn.cursor() as cur:
            tenant = sample[0][0]
            cur.execute("SELECT app.set_community_context(%s)", (tenant,))
            plans["a tenant's 20 newest lots with balances"], _ = explain(
                cur, "SELECT lot_id, remaining_micro, created_at FROM lot_balances ORDER BY created_at DESC LIMIT 20")
            plans["a tenant's total balance (all its lots)"], _ = explain(
                cur, "SELECT count(*), sum(remaining_micro) FROM lot_balances")
            conn.commit()
        res.row("a tenant's 20 newest lots with balances (median of 100)", median(newest), "ms")
        res.row(f"a tenant's total balance, {LOTS // TENANTS} lots (median of 30)", median(total), "ms")
        log(f"tenant's newest lots {median(newest):.2f} ms, tenant's total {median(total):.2f} ms")

        # Insert rate: RLS + FK + triggers against the plain copy, in small alternating blocks so that
        # a change in the machine's load (it is shared) hits both sides alike.
        tables = ("public.lot_entries", "bench_plain.lot_entries")
        single = {t: [0, 0.0] for t in tables}   # rows, seconds
        bulk = {t: [0, 0.0] for t in BULK_VARIANTS}
        single_pairs, bulk_pairs = [], {}
        blocks = max(1, SINGLE_ROWS // SINGLE_BLOCK) * runs
        k = 0
        with conn.cursor() as cur:
            for b in range(blocks):
                took = {}
                for table in (tables if b % 2 == 0 else tables[::-1]):
                    sql = INSERT_ONE.format(table=table)
                    t = time.perf_counter()
                    for _ in range(SINGLE_BLOCK):
                        k += 1
                        tenant, lot = sample[k % len(sample)]
                        cur.execute("SELECT app.set_community_context(%s)", (tenant,))
                        cur.execute(sql, (lot, tenant, f"s-{k}"))
                        conn.commit()
                    took[table] = time.perf_counter() - t
                    single[table][0] += SINGLE_BLOCK
                    single[table][1] += took[table]
                single_pairs.append(took[tables[0]] / took[tables[1]])
            log(f"single-row transactions: {SINGLE_ROWS * runs:,} per table in blocks of {SINGLE_BLOCK}, "
                f"guarded {single[tables[0]][0] / single[tables[0]][1]:,.0f} rows/s, "
                f"plain {single[tables[1]][0] / single[tables[1]][1]:,.0f} rows/s")
            for b in range(BULK_STATEMENTS * runs):
                took = {}
                tnum = b % TENANTS
                order = BULK_VARIANTS[b % len(BULK_VARIANTS):] + BULK_VARIANTS[:b % len(BULK_VARIANTS)]
                for table in order:
                    cur.execute("SELECT app.set_community_context(%s)", (tenant_uuid(tnum),))
                    t = time.perf_counter()
                    cur.execute(INSERT_BULK.format(table=table, t=tnum, tenants=TENANTS, lots=LOTS,
                                                   tuuid=tenant_uuid(tnum), tag=f"b{b}", rows=BULK_ROWS))
                    conn.commit()
                    took[table] = time.perf_counter() - t
                    bulk[table][0] += BULK_ROWS
                    bulk[table][1] += took[table]
                for table in BULK_VARIANTS:
                    bulk_pairs.setdefault(table, []).append(took[table] / took[tables[1]])
            log(f"bulk: {BULK_STATEMENTS * runs} statements of {BULK_ROWS:,} rows per table, "
                f"guarded {bulk[tables[0]][0] / bulk[tables[0]][1]:,.0f} rows/s, "
                f"plain {bulk[tables[1]][0] / bulk[tables[1]][1]:,.0f} rows/s")
        with conn.cursor() as cur:
            for table in tables:
                cur.execute("SELECT app.set_community_context(%s)", (tenant_uuid(7),))
                plans[f"bulk insert of 10,000 rows into {table} (rolled back)"], _ = explain(
                    cur, INSERT_BULK.format(table=table, t=7, tenants=TENANTS, lots=LOTS, tuuid=tenant_uuid(7),
                                            tag="explain", rows=10_000))
                conn.rollback()
    finally:
        conn.close()
        cl.drop_db(db)

    for label, data, pairs in (("single-row transactions", single, single_pairs),
                               ("bulk INSERT ... SELECT", bulk, bulk_pairs[tables[0]])):
        guarded = data[tables[0]][0] / data[tables[0]][1]
        plain = data[tables[1]][0] / data[tables[1]][1]
        overhead = median(pairs)
        res.row(f"insert rate, {label}, RLS+FK+triggers", guarded, "rows/s")
        res.row(f"insert rate, {label}, plain copy", plain, "rows/s")
        res.row(f"insert overhead, {label} (median of {len(pairs)} paired blocks)", overhead, "x",
                f"<= {GOAL_OVERHEAD:g}x", overhead <= GOAL_OVERHEAD)
    for table, what in (("bench_plain.lot_entries_fk", "the foreign key alone"),
                        ("bench_plain.lot_entries_rls", "the RLS policy alone")):
        res.row(f"insert overhead, bulk, {what} (plain copy + it)", median(bulk_pairs[table]), "x")
    res.details["insert"] = {"single": single, "bulk": bulk, "single_pair_ratios": single_pairs,
                             "bulk_pair_ratios": bulk_pairs}
    res.details["balance_ms"] = {"client": balance, "server": server}
    res.details["plans"] = plans
    for name, text in plans.items():
        print(f"\n--- EXPLAIN (ANALYZE, BUFFERS): {name} ---\n{text}")
    print()
