"""Pre-existing application data of a given size, generated server-side.

Nine tables in schema `shop` (the application's data that exists before the ledger
migrations): some compress well (text, jsonb, numbers), some not at all (random
bytea, about 40% of the bytes), with primary keys, secondary indexes and foreign keys,
so that dumps, restores and index builds do realistic work. Rows come from
generate_series in INSERT ... SELECT statements, two tables at a time (one per core);
each table is first calibrated with a small batch so that the database ends close to
the requested size.
"""

from __future__ import annotations

import queue
import threading
import time

from lib import Cluster, log

# name -> (share of the bytes, DDL, INSERT ... SELECT over generate_series(:lo, :hi) g, secondary indexes)
TABLES = {
    "customers": (0.05, """
        CREATE TABLE shop.customers (id bigint PRIMARY KEY, email text NOT NULL, name text NOT NULL,
                                     country char(2) NOT NULL, created_at timestamptz NOT NULL)""",
                  """INSERT INTO shop.customers
                     SELECT g, 'user' || g || '@example.com', 'Customer ' || md5(g::text),
                            (ARRAY['DE','FR','US','GB','JP','BR','IN','NG'])[1 + g % 8],
                            timestamptz '2020-01-01' + g * interval '1 second'
                     FROM generate_series({lo}::bigint, {hi}::bigint) g""",
                  ["CREATE INDEX ON shop.customers (email)"]),
    "orders": (0.10, """
        CREATE TABLE shop.orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, status text NOT NULL,
                                  total numeric(12,2) NOT NULL, created_at timestamptz NOT NULL)""",
               """INSERT INTO shop.orders
                  SELECT g, 1 + (g * 7919) % {customers}, (ARRAY['new','paid','shipped','refunded'])[1 + g % 4],
                         (g % 100000) / 100.0, timestamptz '2021-01-01' + g * interval '1 second'
                  FROM generate_series({lo}::bigint, {hi}::bigint) g""",
               ["CREATE INDEX ON shop.orders (customer_id)", "CREATE INDEX ON shop.orders (created_at)"]),
    "order_items": (0.15, """
        CREATE TABLE shop.order_items (id bigint PRIMARY KEY, order_id bigint NOT NULL, sku text NOT NULL,
                                       qty integer NOT NULL, price numeric(12,2) NOT NULL)""",
                    """INSERT INTO shop.order_items
                       SELECT g, 1 + g % {orders}, 'SKU-' || lpad((g % 50000)::text, 6, '0'), 1 + g % 5,
                              (g % 9999) / 100.0
                       FROM generate_series({lo}::bigint, {hi}::bigint) g""",
                    ["CREATE INDEX ON shop.order_items (order_id)"]),
    "events": (0.15, """
        CREATE TABLE shop.events (id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL,
                                  payload jsonb NOT NULL)""",
               """INSERT INTO shop.events
                  SELECT g, timestamptz '2022-01-01' + g * interval '100 ms',
                         (ARRAY['login','view','cart','checkout','logout'])[1 + g % 5],
                         jsonb_build_object('session', md5(g::text), 'page', '/product/' || (g % 5000),
                                            'agent', 'Mozilla/5.0 (X11; Linux x86_64)', 'n', g)
                  FROM generate_series({lo}::bigint, {hi}::bigint) g""",
               ["CREATE INDEX ON shop.events (at)"]),
    "audit_log": (0.10, """
        CREATE TABLE shop.audit_log (id bigint PRIMARY KEY, at timestamptz NOT NULL, actor text NOT NULL,
                                     message text NOT NULL)""",
                  """INSERT INTO shop.audit_log
                     SELECT g, timestamptz '2022-01-01' + g * interval '1 second', 'svc-' || (g % 20),
                            'changed record ' || md5(g::text) || ' from ' || md5((g + 1)::text)
                     FROM generate_series({lo}::bigint, {hi}::bigint) g""",
                  []),
    "metrics": (0.05, """
        CREATE TABLE shop.metrics (id bigint PRIMARY KEY, host integer NOT NULL, cpu double precision NOT NULL,
                                   mem double precision NOT NULL, at timestamptz NOT NULL)""",
                """INSERT INTO shop.metrics
                   SELECT g, g % 64, random() * 100, random() * 65536, timestamptz '2023-01-01' + g * interval '1 second'
                   FROM generate_series({lo}::bigint, {hi}::bigint) g""",
                []),
    # Incompressible: random bytes (pgcrypto's gen_random_bytes), kept under the TOAST threshold.
    "attachments": (0.20, """
        CREATE TABLE shop.attachments (id bigint PRIMARY KEY, order_id bigint NOT NULL, name text NOT NULL,
                                       body bytea NOT NULL)""",
                    """INSERT INTO shop.attachments
                       SELECT g, 1 + g % {orders}, 'scan-' || g || '.pdf', gen_random_bytes(1000)
                       FROM generate_series({lo}::bigint, {hi}::bigint) g""",
                    ["CREATE INDEX ON shop.attachments (order_id)"]),
    "images": (0.15, """
        CREATE TABLE shop.images (id bigint PRIMARY KEY, body bytea NOT NULL)""",
               """INSERT INTO shop.images SELECT g, gen_random_bytes(1024) || gen_random_bytes(400)
                  FROM generate_series({lo}::bigint, {hi}::bigint) g""",
               []),
    "api_tokens": (0.05, """
        CREATE TABLE shop.api_tokens (id bigint PRIMARY KEY, customer_id bigint NOT NULL, token bytea NOT NULL,
                                      created_at timestamptz NOT NULL)""",
                   """INSERT INTO shop.api_tokens
                      SELECT g, 1 + g % {customers}, gen_random_bytes(32), timestamptz '2023-01-01' + g * interval '1 minute'
                      FROM generate_series({lo}::bigint, {hi}::bigint) g""",
                   ["CREATE UNIQUE INDEX ON shop.api_tokens (token)"]),
}

FOREIGN_KEYS = [
    "ALTER TABLE shop.orders ADD FOREIGN KEY (customer_id) REFERENCES shop.customers (id)",
    "ALTER TABLE shop.order_items ADD FOREIGN KEY (order_id) REFERENCES shop.orders (id)",
    "ALTER TABLE shop.attachments ADD FOREIGN KEY (order_id) REFERENCES shop.orders (id)",
    "ALTER TABLE shop.api_tokens ADD FOREIGN KEY (customer_id) REFERENCES shop.customers (id)",
]

CALIBRATION_ROWS = 20000
BATCH_ROWS = 400000


def _sql(template: str, params: dict) -> str:
    """Fill {name} placeholders with integers (the statements are sent as they are)."""
    for key, value in params.items():
        template = template.replace("{" + key + "}", str(int(value)))
    return template


def generate(cluster: Cluster, db: str, gigabytes: float, workers: int = 2) -> dict:
    """Fill `db` (which must exist) with about `gigabytes` of data; returns what was made."""
    started = time.perf_counter()
    target = gigabytes * 1024 ** 3
    conn = cluster.connect(db)
    with conn.cursor() as cur:
        cur.execute("CREATE SCHEMA shop")
        cur.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public")
        for name, (_share, ddl, _ins, _idx) in TABLES.items():
            cur.execute(ddl)
    # Calibrate: bytes per row of each table (heap + primary key), from a first batch.
    per_row = {}
    rows = {}
    params = {"customers": CALIBRATION_ROWS, "orders": CALIBRATION_ROWS}
    with conn.cursor() as cur:
        for name, (_share, _ddl, ins, _idx) in TABLES.items():
            cur.execute(_sql(ins, dict(params, lo=1, hi=CALIBRATION_ROWS)))
            cur.execute("SELECT pg_total_relation_size(%s)", (f"shop.{name}",))
            per_row[name] = max(cur.fetchone()[0] / CALIBRATION_ROWS, 1.0)
    conn.close()
    for name, (share, *_rest) in TABLES.items():
        # Secondary indexes add roughly 15% on the tables that have them.
        factor = 1.15 if TABLES[name][3] else 1.0
        rows[name] = max(CALIBRATION_ROWS, int(target * share / (per_row[name] * factor)))
    params = {"customers": rows["customers"], "orders": rows["orders"]}

    jobs: queue.Queue = queue.Queue()
    for name, (_share, _ddl, ins, _idx) in sorted(TABLES.items(), key=lambda kv: -rows[kv[0]]):
        lo = CALIBRATION_ROWS + 1
        while lo <= rows[name]:
            hi = min(rows[name], lo + BATCH_ROWS - 1)
            jobs.put((name, _sql(ins, dict(params, lo=lo, hi=hi)), hi))
            lo = hi + 1
    total_jobs = jobs.qsize()
    done = [0]
    errors: list = []
    lock = threading.Lock()
    last_report = [time.perf_counter()]

    def worker():
        wconn = cluster.connect(db)
        try:
            with wconn.cursor() as cur:
                while not errors:
                    try:
                        name, sql, hi = jobs.get_nowait()
                    except queue.Empty:
                        return
                    cur.execute(sql)
                    with lock:
                        done[0] += 1
                        if time.perf_counter() - last_report[0] > 10:
                            last_report[0] = time.perf_counter()
                            log(f"  data: {done[0]}/{total_jobs} batches ({name} at row {hi:,})")
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            wconn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]

    # Indexes and foreign keys after the load (as a restore does), then statistics and hint bits.
    stmts = [idx for (_s, _d, _i, idxs) in TABLES.values() for idx in idxs]
    conn = cluster.connect(db)
    with conn.cursor() as cur:
        for stmt in stmts + FOREIGN_KEYS:
            cur.execute(stmt)
        cur.execute("DROP EXTENSION pgcrypto")
        cur.execute("VACUUM (ANALYZE)")
        cur.execute("CHECKPOINT")
    conn.close()
    size = cluster.db_size(db)
    return {"requested_gb": gigabytes, "bytes": size, "tables": len(TABLES), "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def append_share(cluster: Cluster, db: str, share: float = 0.01) -> int:
    """A day of a growing database: append `share` of each table's rows (new ids, as a ledger grows).

    Returns the rows appended. The same INSERT ... SELECT as the generation, beyond each table's max id.
    """
    conn = cluster.connect(db)
    total = 0
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA public")
            cur.execute("SELECT (SELECT max(id) FROM shop.customers), (SELECT max(id) FROM shop.orders)")
            customers, orders = cur.fetchone()
            for name, (_share, _ddl, ins, _idx) in TABLES.items():
                cur.execute(f"SELECT coalesce(max(id), 0), count(*) FROM shop.{name}")
                top, count = cur.fetchone()
                rows = max(1, int(count * share))
                cur.execute(_sql(ins, {"customers": customers, "orders": orders, "lo": top + 1, "hi": top + rows}))
                total += rows
            cur.execute("DROP EXTENSION pgcrypto")
    finally:
        conn.close()
    return total
