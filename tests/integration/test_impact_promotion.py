"""Staging measures, production enforces (issue 14): the pipeline on two real PostgreSQL 15 databases.

Staging (policy warn) rehearses a plain CREATE INDEX on a 5000-row table (threshold lowered
to 1000), applies it and stamps the set with the profile it measured. Production (policy
refuse) refuses from the stamp, at its own table size (reported as >10x staging's), without
rehearsing the index build: a session holds the table in ROW EXCLUSIVE, on which the build's
SHARE lock would wait, and the precheck neither waits for it nor times out on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import yaml
from ledgertest import RUNBOOK_SET

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = RUNBOOK_SET  # the runbook's 0008-0011, whatever else files/migrations holds
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
HEAVY = "-- an index on the application's big table\nCREATE INDEX big_a ON public.big (a);\n"


def prepare(url, mdir, rows):
    """0008-0011 applied by the engine, plus public.big (outside the set) with ``rows`` rows, ANALYZEd."""
    engine.apply(url, engine.load_migration_set(str(mdir)), target="0011", advice=PlaybookAdvice("t"))
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE public.big (id bigint PRIMARY KEY, a int);"
                    " INSERT INTO public.big SELECT g, g %% 97 FROM generate_series(1, %s) g; ANALYZE public.big",
                    (rows,))
    conn.close()


def test_staging_profile_travels_in_the_stamp_and_production_refuses_without_rehearsing(tmp_path, pg_cluster):
    mdir = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, mdir)
    names = {env: pg_cluster.create_db() for env in ("staging", "production")}
    urls = {env: pg_cluster.url(name) for env, name in names.items()}
    holder = None
    try:
        prepare(urls["staging"], mdir, 5000)
        prepare(urls["production"], mdir, 60000)
        (mdir / "0012_big_index.sql").write_text(HEAVY)
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {"hosts": {
            f"{env}-db": {"database_url": url, "ledger_environment": env} for env, url in urls.items()}}}))

        def migrate(limit):
            cmd = [ANSIBLE_PLAYBOOK, "playbooks/migrate.yml", "-i", str(inventory), "-l", limit,
                   "-e", f"migrations_dir={mdir}", "-e", f"promotion_dir={tmp_path / 'promotions'}",
                   "-e", f"backup_dir={tmp_path / 'backups'}", "-e", f"report_dir={tmp_path / 'reports'}",
                   "-e", "maintenance_window_ack=true", "-e", "migrate_lock_rows_threshold=1000"]
            env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
            for name in ("DATABASE_URL", "LEDGER_STAGING_URL"):
                env.pop(name, None)
            return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

        staged = migrate("staging-db")
        assert staged.returncode == 0, staged.stdout[-4000:]
        assert "migrate_lock_policy=warn: 1 lock impact(s)" in staged.stdout
        [markdown] = (tmp_path / "reports").glob("*.md")
        assert "Impact profile (policy warn, large above 1000 rows)" in markdown.read_text()
        assert "| 0012_big_index.sql | 2 | public.big | SHARE | no | 5000 | " in markdown.read_text()
        [stamp_file] = (tmp_path / "promotions").glob("*.json")
        [entry] = json.loads(stamp_file.read_text())["stamps"]
        [profiled] = entry["impact"]
        assert profiled["filename"] == "0012_big_index.sql"
        [statement] = profiled["statements"]
        assert statement["line"] == 2 and statement["observed"] is True
        assert [(r["relation"], r["lock"], r["rows"]) for r in statement["relations"]] == [("public.big", "SHARE", 5000)]

        # A writer holds ROW EXCLUSIVE on production's big table: a rehearsed CREATE INDEX would wait for it.
        holder = psycopg2.connect(urls["production"])
        with holder.cursor() as cur:
            cur.execute("INSERT INTO public.big VALUES (-1, 0)")
        started = time.monotonic()
        refused = migrate("production-db")
        took = time.monotonic() - started
        out = refused.stdout
        assert refused.returncode != 0, out[-4000:]
        assert "lock_impact: migrate_lock_policy=refuse: 1 lock impact(s)" in out, out[-4000:]
        assert "0012_big_index.sql line 2: SHARE lock on public.big (60000 rows)" in out
        assert "ledger:allow-lock public.big" in out
        assert "public.big 60000 rows here, 5000 on staging" in out  # >10x: said
        # Never rehearsed here: no lock timeout, no wait behind the writer.
        assert "not rehearsed here" in out and "lock timeout" not in out, out[-4000:]
        with psycopg2.connect(urls["production"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.big_a') IS NULL,"
                        " (SELECT count(*) FROM migrations.history WHERE version = '0012')")
            assert cur.fetchone() == (True, 0)
        report = json.loads(sorted((tmp_path / "reports").glob("*.json"), key=lambda p: p.stat().st_mtime)[-1]
                            .read_text())
        impact = report["targets"]["production-db"]["impact"]
        assert impact["impacts"][0]["table"] == "public.big" and impact["policy"] == "refuse"
        assert took < 120
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
        for name in names.values():
            pg_cluster.drop_db(name)
