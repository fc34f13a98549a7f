"""The impact profile of a rehearsal and the lock policy (issue 14), on a real PostgreSQL 15.

Small tables with a lowered threshold (1000 rows, ANALYZEd so reltuples is real) stand
in for large ones: each lock mode and the rewrite case are observed from pg_locks and
pg_class, a no-transaction file is profiled from the documentation, the allow-lock
directive passes, both policies, and squawk's verdict is compared both ways.
"""

from __future__ import annotations

import time

import psycopg2
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact as impact
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact_policy as policy
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError

from ledgertest import load, write_set

THRESHOLD = 1000


def make_tables(url, *bigs):
    """public.big (and each of ``bigs``) with 5000 rows, public.small with 50, ANALYZEd.

    A rehearsal runs every file in one transaction, so a lock an earlier file took is
    already held for the later ones (not new to them): independent cases use tables of
    their own.
    """
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in ("big",) + bigs:
            cur.execute("CREATE TABLE public.%s (id bigint PRIMARY KEY, a int, b text);"
                        " INSERT INTO public.%s SELECT g, g %% 97, 'x' || g FROM generate_series(1, 5000) g;"
                        " ANALYZE public.%s" % (name, name, name))
        cur.execute("CREATE TABLE public.small (id int PRIMARY KEY, a int);"
                    " INSERT INTO public.small SELECT g, g FROM generate_series(1, 50) g; ANALYZE public.small")
    conn.close()


def profile(url, tmp_path, files):
    migrations = load(write_set(tmp_path / "set", files))
    results = engine.rehearse(url, migrations)
    assert all(r["status"] == "would_apply" for r in results), results
    return migrations, results


def entry(results, filename, line=None):
    r = next(r for r in results if r["filename"] == filename)
    sts = r["impact"] if line is None else [s for s in r["impact"] if s["line"] == line]
    return [rel for s in sts for rel in s["relations"]]


def test_each_lock_mode_and_the_rewrite_are_observed(empty_db, tmp_path):
    make_tables(empty_db, "big2", "big3", "big4", "big5", "big6", "big7", "big8", "big9")
    migrations, results = profile(empty_db, tmp_path, {
        "0001_nullable.sql": "ALTER TABLE public.big ADD COLUMN c int;\n",
        "0002_volatile.sql": "ALTER TABLE public.big2 ADD COLUMN d double precision DEFAULT random();\n",
        "0003_index.sql": "CREATE INDEX big3_a ON public.big3 (a);\n",
        "0004_fk.sql": "ALTER TABLE public.small ADD CONSTRAINT s_fk FOREIGN KEY (a) REFERENCES public.big4 (id);\n",
        "0005_validate.sql": "ALTER TABLE public.big5 ADD CONSTRAINT a_pos CHECK (a >= 0) NOT VALID;\n"
                             "ALTER TABLE public.big5 VALIDATE CONSTRAINT a_pos;\n",
        "0006_dml.sql": "UPDATE public.small SET a = a WHERE id = 1;\nSELECT count(*) FROM public.big6;\n",
        "0007_new.sql": "CREATE TABLE public.fresh (i int);\nCREATE INDEX fresh_i ON public.fresh (i);\n",
        # A brief ACCESS EXCLUSIVE, then a full UPDATE while the file still holds it.
        "0008_backfill.sql": "ALTER TABLE public.big7 ADD COLUMN c int;\nUPDATE public.big7 SET c = 1;\n",
        "0009_modes.sql": "SELECT id FROM public.big8 WHERE id = 1 FOR UPDATE;\nLOCK TABLE public.big9 IN EXCLUSIVE MODE;\n",
    })
    nullable = entry(results, "0001_nullable.sql")
    assert nullable == [dict(nullable[0], relation="public.big", lock="ACCESS EXCLUSIVE", rewrite=False, rows=5000)]
    volatile = entry(results, "0002_volatile.sql")
    assert dict((r["relation"], (r["lock"], r["rewrite"])) for r in volatile) == {
        "public.big2": ("ACCESS EXCLUSIVE", True), "public.big2_pkey": ("ACCESS EXCLUSIVE", True)}
    index = entry(results, "0003_index.sql")
    assert [(r["relation"], r["lock"], r["rewrite"]) for r in index] == [("public.big3", "SHARE", False)]
    fk = dict((r["relation"], r["lock"]) for r in entry(results, "0004_fk.sql"))
    # ADD FOREIGN KEY: SHARE ROW EXCLUSIVE on both tables (PostgreSQL's documented level), observed.
    assert fk == {"public.small": "SHARE ROW EXCLUSIVE", "public.big4": "SHARE ROW EXCLUSIVE"}
    assert entry(results, "0005_validate.sql", 2) == [dict(entry(results, "0005_validate.sql", 2)[0],
                                                           lock="SHARE UPDATE EXCLUSIVE", rewrite=False)]
    dml = dict((r["relation"], r["lock"]) for r in entry(results, "0006_dml.sql"))
    assert dml == {"public.small": "ROW EXCLUSIVE", "public.big6": "ACCESS SHARE"}
    assert [(r["relation"], r["lock"]) for r in entry(results, "0009_modes.sql", 1)] == [("public.big8", "ROW SHARE")]
    assert [(r["relation"], r["lock"]) for r in entry(results, "0009_modes.sql", 2)] == [("public.big9", "EXCLUSIVE")]
    # Relations the migrations create are no impact on anyone: not in the profile.
    assert entry(results, "0007_new.sql") == []
    assert all(isinstance(s["ms"], int) for r in results for s in r["impact"])

    found = policy.impacts(results, THRESHOLD)
    # A strong lock is an impact when the file works on the table under it: the nullable
    # column's ACCESS EXCLUSIVE is brief; the rewrite, the index build, the FK's validation
    # (it reads big4 under SHARE ROW EXCLUSIVE), VALIDATE in the same file as the NOT VALID
    # constraint (whose ACCESS EXCLUSIVE is still held) and the backfill under the column's
    # lock hold the table for its whole size.
    assert sorted((i["file"], i["table"], i["lock"], i["rewrite"], i["line"], i["work_line"]) for i in found) == [
        ("0002_volatile.sql", "public.big2", "ACCESS EXCLUSIVE", True, 1, 1),
        ("0003_index.sql", "public.big3", "SHARE", False, 1, 1),
        ("0004_fk.sql", "public.big4", "SHARE ROW EXCLUSIVE", False, 1, 1),
        ("0005_validate.sql", "public.big5", "ACCESS EXCLUSIVE", False, 1, 2),
        ("0008_backfill.sql", "public.big7", "ACCESS EXCLUSIVE", False, 1, 2),
    ]
    # Above the threshold nothing is large: no impact at all.
    assert policy.impacts(results, 100000) == []
    table = "\n".join(policy.format_table(results))
    assert "0002_volatile.sql impact:" in table and "yes" in table and "public.big" in table


def test_what_the_snapshot_leaves_open_is_read_after_the_rollback(empty_db, tmp_path):
    """The profile's start reads pg_class's plain columns only: an index's table, and the size of
    a table never ANALYZEd (its rows guessed from it), are read once the rehearsal is rolled back,
    as they were before it. Partitions a statement rewrites without naming them, and a schema
    whose name needs quoting, are profiled like any table."""
    conn = psycopg2.connect(empty_db)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Never ANALYZEd (reltuples -1): ~2.6 MB, so ~26,000 rows guessed at 100 bytes a row.
        cur.execute("CREATE TABLE public.raw (id bigint PRIMARY KEY, pad text);"
                    " INSERT INTO public.raw SELECT g, repeat('x', 60) FROM generate_series(1, 30000) g")
        cur.execute("CREATE TABLE public.parted (id bigint, a int) PARTITION BY RANGE (id);"
                    " CREATE TABLE public.parted_1 PARTITION OF public.parted FOR VALUES FROM (0) TO (5000);"
                    " CREATE TABLE public.parted_2 PARTITION OF public.parted FOR VALUES FROM (5000) TO (10000);"
                    " INSERT INTO public.parted SELECT g, g FROM generate_series(0, 9999) g; ANALYZE public.parted")
        cur.execute('CREATE SCHEMA "Odd ""Schema"""; CREATE TABLE "Odd ""Schema""".t (id int PRIMARY KEY);'
                    ' INSERT INTO "Odd ""Schema""".t SELECT generate_series(1, 2000); ANALYZE "Odd ""Schema""".t')
        cur.execute("SELECT pg_relation_size('public.raw')")
        raw_guess = cur.fetchone()[0] // impact.BYTES_PER_ROW_GUESS
    conn.close()
    _m, results = profile(empty_db, tmp_path, {
        "0001_raw.sql": "ALTER TABLE public.raw ALTER COLUMN pad TYPE varchar;\n"
                        "ALTER TABLE public.raw ADD COLUMN r float8 DEFAULT random();\n",
        "0002_parted.sql": "ALTER TABLE public.parted ADD COLUMN r float8 DEFAULT random();\n",
        "0003_odd.sql": 'ALTER TABLE "Odd ""Schema""".t ADD COLUMN c float8 DEFAULT random();\n',
        "0004_reindex.sql": "-- ledger:no-transaction\nREINDEX INDEX CONCURRENTLY public.raw_pkey;\n",
    })
    raw = dict((r["relation"], r) for r in entry(results, "0001_raw.sql", 2))
    assert raw_guess > 20000 and set(raw) == {"public.raw", "public.raw_pkey"}
    assert raw["public.raw"]["rewrite"] is True and raw["public.raw_pkey"]["rewrite"] is True
    for rel in raw.values():  # the index weighs its table: never ANALYZEd, rows from the size before the rewrite
        assert (rel["table"], rel["rows"], rel["rows_guessed"]) == ("public.raw", raw_guess, True), rel
    # A binary-compatible type change (varchar from text) rewrites nothing.
    assert [(r["relation"], r["rewrite"]) for r in entry(results, "0001_raw.sql", 1)] == [("public.raw", False)]
    parted = dict((r["relation"], (r["lock"], r["rewrite"], r["rows"])) for r in entry(results, "0002_parted.sql"))
    assert parted["public.parted_1"] == ("ACCESS EXCLUSIVE", True, 5000)
    assert parted["public.parted_2"] == ("ACCESS EXCLUSIVE", True, 5000)
    assert parted["public.parted"][:2] == ("ACCESS EXCLUSIVE", False)
    odd = entry(results, "0003_odd.sql")
    assert [(r["relation"], r["lock"], r["rewrite"], r["rows"]) for r in odd] == [
        ('Odd "Schema".t', "ACCESS EXCLUSIVE", True, 2000), ('Odd "Schema".t_pkey', "ACCESS EXCLUSIVE", True, 2000)]
    [documented] = entry(results, "0004_reindex.sql")
    assert (documented["relation"], documented["kind"], documented["table"], documented["rows"]) == (
        "public.raw_pkey", "index", "public.raw", raw_guess)
    found = dict((i["table"], i) for i in policy.impacts(results, THRESHOLD))
    assert found["public.raw"]["rewrite"] and found["public.raw"]["rows_guessed"]
    assert set(found) == {"public.raw", "public.parted_1", "public.parted_2", 'Odd "Schema".t'}


def test_names_no_statement_runs_now_are_read_after_the_rollback(empty_db, tmp_path, monkeypatch):
    """What the profile's start does not look up is still profiled: a table only a PL/pgSQL body
    names, locked when a later statement fires it, is read after the rollback; a quoted name of
    any characters is found by the start; an index no statement names and nothing rewrites (an
    FK's referenced key) costs no look-up at all."""
    conn = psycopg2.connect(empty_db)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE public.audit_rows (n bigint); INSERT INTO public.audit_rows VALUES (0);"
                    ' CREATE TABLE public."we{i}rd, ""t\\ab le" (id int PRIMARY KEY);'
                    " CREATE TABLE public.orders (id int PRIMARY KEY, note text);"
                    " INSERT INTO public.orders SELECT generate_series(1, 3000); ANALYZE")
    conn.close()
    looked_up = []
    details = impact.Profiler._details
    monkeypatch.setattr(impact.Profiler, "_details", lambda self, cur, oids: looked_up.append(set(oids)) or
                        details(self, cur, oids))
    _m, results = profile(empty_db, tmp_path, {
        "0001_trigger.sql": "CREATE FUNCTION public.count_order() RETURNS trigger LANGUAGE plpgsql AS $$\n"
                            "BEGIN UPDATE public.audit_rows SET n = n + 1; RETURN NEW; END $$;\n"
                            "CREATE TRIGGER count_order AFTER UPDATE ON public.orders\n"
                            "  FOR EACH ROW EXECUTE FUNCTION public.count_order();\n"
                            "UPDATE public.orders SET note = 'seen' WHERE id = 1;\n",
        "0002_quoted.sql": 'ALTER TABLE public."we{i}rd, ""t\\ab le" ADD COLUMN c int;\n',
    })
    fired = dict((r["relation"], r) for r in entry(results, "0001_trigger.sql", 5))
    assert fired["public.audit_rows"]["lock"] == "ROW EXCLUSIVE" and fired["public.orders"]["rows"] == 3000
    assert [(r["relation"], r["lock"]) for r in entry(results, "0002_quoted.sql")] == [
        ('public.we{i}rd, "t\\ab le', "ACCESS EXCLUSIVE")]
    assert len(looked_up) == 1  # audit_rows alone, after the rollback
    assert len(looked_up[0]) == 1
    looked_up.clear()
    make_tables(empty_db)
    _m, results = profile(empty_db, tmp_path / "fk", {
        "0001_fk.sql": "CREATE TABLE public.child (id int PRIMARY KEY, big_id bigint REFERENCES public.big (id));\n"})
    assert [(r["relation"], r["lock"]) for r in entry(results, "0001_fk.sql")] == [("public.big", "SHARE ROW EXCLUSIVE")]
    assert looked_up == []  # big_pkey, read under ACCESS SHARE for the FK, needed no look-up


def test_no_transaction_file_is_documented_not_observed(empty_db, tmp_path):
    make_tables(empty_db)
    _m, results = profile(empty_db, tmp_path, {
        "0001_cic.sql": "-- ledger:no-transaction\nCREATE INDEX CONCURRENTLY big_b ON public.big (b);\n",
        "0002_after.sql": "SELECT 1;\n",
    })
    st = results[0]["impact"][0]
    assert st["observed"] is False and "not observed" in st["note"]
    assert st["relations"][0]["lock"] == "SHARE UPDATE EXCLUSIVE" and st["relations"][0]["rows"] == 5000
    assert policy.impacts(results, THRESHOLD) == []
    # The rehearsal's plain CREATE INDEX (SHARE) does not leak into the next file's observation.
    assert results[1]["impact"] == [dict(results[1]["impact"][0], relations=[])]


def test_the_directive_and_both_policies(empty_db, tmp_path):
    make_tables(empty_db)
    _m, results = profile(empty_db, tmp_path, {
        "0001_index.sql": "-- ledger:allow-lock public.big\nCREATE INDEX big_a ON public.big (a);\n",
        "0002_rewrite.sql": "ALTER TABLE public.big ALTER COLUMN a TYPE bigint;\n",
    })
    found = policy.impacts(results, THRESHOLD)
    assert [(i["file"], i["allowed"]) for i in found] == [("0001_index.sql", True), ("0002_rewrite.sql", False)]
    passed, msg, nxt = policy.policy_verdict(found, "refuse", THRESHOLD)
    assert passed is False
    assert "0002_rewrite.sql line 1: ACCESS EXCLUSIVE lock and a rewrite on public.big (5000 rows)" in msg, msg
    assert "-- ledger:allow-lock public.big" in nxt and "0002_rewrite.sql" in nxt
    passed, msg, _n = policy.policy_verdict(found, "warn", THRESHOLD)
    assert passed is True and msg.startswith("migrate_lock_policy=warn")
    passed, msg, _n = policy.policy_verdict(found[:1], "refuse", THRESHOLD)
    assert passed is True and "intended by -- ledger:allow-lock" in msg


def test_allow_lock_needs_a_qualified_table(tmp_path):
    with pytest.raises(LedgerError, match="one schema-qualified table per line"):
        load(write_set(tmp_path / "set", {"0001_x.sql": "-- ledger:allow-lock big\nSELECT 1;\n"}))


def test_squawk_and_the_profile_disagree_both_ways(empty_db, tmp_path):
    make_tables(empty_db)
    migrations, results = profile(empty_db, tmp_path, {
        # squawk warns, but the table is small: no impact observed.
        "0001_small_index.sql": "CREATE INDEX small_a ON public.small (a);\n",
        # squawk is silent on a type change to a binary-incompatible type? it warns; on an
        # ALTER COLUMN SET NOT NULL-free rewrite through a USING clause it is silent.
        "0002_cluster.sql": "CLUSTER public.big USING big_pkey;\n",
    })
    notes = policy.compare_squawk(results, migrations, THRESHOLD)
    assert any(n["file"] == "0001_small_index.sql" and n["squawk"] == ["require-concurrent-index-creation"]
               and not n["observed_impact"] for n in notes), notes
    assert any(n["file"] == "0002_cluster.sql" and n["observed_impact"] and n["squawk"] == [] for n in notes), notes



# --------------------------------------------------------------------------- the precheck's policy

from pghelpers import load_module  # noqa: E402

precheck = load_module("ledger_precheck", prefix="")


def run_precheck(url, mdir, **params):
    return precheck.run_precheck(dict(database_url=url, migrations_dir=str(mdir), run_id="t-impact",
                                      lock_rows_threshold=THRESHOLD, **params), check_mode=True)


def test_precheck_refuses_an_impact_before_any_change_and_warn_reports_it(empty_db, tmp_path):
    make_tables(empty_db)
    mdir = write_set(tmp_path / "set", {"0001_index.sql": "-- builds an index\nCREATE INDEX big_a ON public.big (a);\n"})
    refused = run_precheck(empty_db, mdir, lock_policy="refuse")
    assert refused["failed_checks"] == ["lock_impact"], refused["msg"]
    msg = refused["msg"]
    assert "0001_index.sql line 2: SHARE lock on public.big (5000 rows)" in msg
    assert "next: make the change without the strong lock" in msg and "-- ledger:allow-lock public.big" in msg
    assert refused["impact"]["impacts"][0]["table"] == "public.big"
    with psycopg2.connect(empty_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.big_a') IS NULL, to_regclass('migrations.events') IS NULL")
        assert cur.fetchone() == (True, True)  # nothing changed
    warned = run_precheck(empty_db, mdir, lock_policy="warn")
    assert not warned["failed"], warned["msg"]
    lines = "\n".join(warned["impact_lines"])
    assert "lock impact: migrate_lock_policy=warn: 1 lock impact(s)" in lines
    assert "0001_index.sql line 2: SHARE lock on public.big (5000 rows)" in lines


def test_precheck_passes_an_impact_the_file_declares(empty_db, tmp_path):
    make_tables(empty_db)
    mdir = write_set(tmp_path / "set", {
        "0001_index.sql": "-- ledger:allow-lock public.big\nCREATE INDEX big_a ON public.big (a);\n"})
    result = run_precheck(empty_db, mdir, lock_policy="refuse")
    assert not result["failed"], result["msg"]
    assert "intended by -- ledger:allow-lock" in result["impact_lines"][0]


def test_a_statement_marked_heavy_is_never_run_and_so_never_waits(empty_db, tmp_path):
    make_tables(empty_db)
    holder = psycopg2.connect(empty_db)
    try:
        with holder.cursor() as cur:
            cur.execute("INSERT INTO public.big VALUES (-1, 0, 'x')")  # ROW EXCLUSIVE: a build's SHARE waits for it
        migrations = load(write_set(tmp_path / "set", {
            "0001_before.sql": "CREATE TABLE public.other (i int);\n",
            "0002_index.sql": "CREATE TABLE public.more (i int);\nCREATE INDEX big_a ON public.big (a);\n",
            "0003_after.sql": "SELECT 1;\n"}))
        started = time.monotonic()
        results = engine.rehearse(empty_db, migrations, lock_timeout="5s", lock_retries=0,
                                  stop_before={("0002_index.sql", 2): "staging measured SHARE lock on public.big"})
        assert time.monotonic() - started < 5  # never waited for the writer
        assert [r["status"] for r in results] == ["would_apply", "not_rehearsed", "not_rehearsed"]
        assert results[1]["stopped_at"] == 2 and "staging measured SHARE lock" in results[1]["reason"]
        assert [s["line"] for s in results[1]["impact"]] == [1]  # what came before it was rehearsed
        assert results[2]["reason"] == "follows 0002_index.sql line 2, not rehearsed here"
    finally:
        holder.rollback()
        holder.close()


def test_check_mode_prints_the_table_and_squawks_disagreement(empty_db, tmp_path):
    make_tables(empty_db)
    migrate = load_module("ledger_migrate", prefix="")
    mdir = write_set(tmp_path / "set", {"0001_small_index.sql": "CREATE INDEX small_a ON public.small (a);\n",
                                        "0002_big_index.sql": "CREATE INDEX big_a ON public.big (a);\n"})
    params = dict((k, v.get("default")) for k, v in migrate.ARGUMENT_SPEC.items())
    params.update(database_url=empty_db, migrations_dir=str(mdir), lock_rows_threshold=THRESHOLD, limit="t")
    out = migrate.run(params, check_mode=True)
    assert "lock impact: migrate_lock_policy=warn: 1 lock impact(s)" in out["msg"]
    assert "0002_big_index.sql impact:" in out["msg"] and "public.big" in out["msg"]
    # What the operator's screen prints under --check at verbosity 0 (stage_line): the verdict and the table.
    assert out["impact_lines"][0].startswith("lock impact: migrate_lock_policy=warn: 1 lock impact(s)")
    assert "  0002_big_index.sql impact:" in out["impact_lines"]
    assert ("squawk: 0001_small_index.sql line 1: squawk warns (require-concurrent-index-creation), the observed"
            " profile shows no impact") in out["msg"]
    with pytest.raises(LedgerError, match="migrate_lock_policy=refuse: 1 lock impact"):
        migrate.run(dict(params, lock_policy="refuse"), check_mode=True)
