"""No-transaction migrations and PgBouncer: the engine never runs session-level settings through a pooler.

A `-- ledger:no-transaction` file can't scope its settings with SET LOCAL. Through PgBouncer's
transaction pooling they would land on server connections other clients then use, so the
engine refuses such files through a pooler (detected by port) unless `direct_url` is set, and
runs them on a connection of its own that it resets and closes afterwards. Real PgBouncer,
real PostgreSQL 15.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg2
import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import create_records
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError

from ledgertest import load, write_set
from test_engine import events, history, one, q

TESTS = Path(__file__).resolve().parent

SET_WITH_INDEX = {
    "0001_t.sql": "CREATE TABLE t (i int);\nINSERT INTO t SELECT g FROM generate_series(1, 100) g;",
    "0002_t_idx.sql": """
        -- ledger:no-transaction
        SET maintenance_work_mem = '77MB';
        CREATE INDEX CONCURRENTLY IF NOT EXISTS t_i_idx ON t (i);
    """,
    "0002_t_idx.down.sql": "-- ledger:no-transaction\nDROP INDEX CONCURRENTLY IF EXISTS t_i_idx;\n",
    "0003_after.sql": "CREATE TABLE seen AS SELECT current_setting('maintenance_work_mem') AS mwm;",
    "0003_after.down.sql": "DROP TABLE seen;",
}


@pytest.fixture(scope="module")
def bouncer(pg_cluster, tmp_path_factory):
    sys.path.insert(0, str(TESTS.parents[1] / "scripts"))
    import pgbouncer_ctl

    try:
        pgbouncer_ctl.find_binary()
    except pgbouncer_ctl.BouncerError as exc:
        pytest.skip("no pgbouncer: %s" % exc)
    base = tmp_path_factory.mktemp("pgb")
    state = pgbouncer_ctl.start(base, pg_cluster.port, pool_size=2)
    try:
        yield lambda db: pgbouncer_ctl.url(state, db=db)
    finally:
        pgbouncer_ctl.stop(base)


def dbname(url):
    return url.rsplit("/", 1)[1]


def test_connection_route_tells_a_pooler_from_a_direct_connection(bouncer, empty_db):
    direct = psycopg2.connect(empty_db)
    pooled = psycopg2.connect(bouncer(dbname(empty_db)))
    direct.autocommit = pooled.autocommit = True
    try:
        d = engine.connection_route(direct, empty_db)
        p = engine.connection_route(pooled, bouncer(dbname(empty_db)))
    finally:
        direct.close()
        pooled.close()
    assert d["pooled"] is False and d["client_port"] == d["server_port"]
    assert p["pooled"] is True and p["server_port"] == d["server_port"] and p["client_port"] != p["server_port"]


def test_a_no_transaction_file_through_pgbouncer_is_refused_before_any_change(tmp_path, bouncer, empty_db):
    d = write_set(tmp_path / "m", SET_WITH_INDEX)
    create_records(psycopg2.connect(empty_db))
    url = bouncer(dbname(empty_db))
    with pytest.raises(LedgerError) as exc:
        engine.apply(url, load(d), run_id="via-bouncer", advice=PlaybookAdvice("staging"))
    msg = exc.value.msg
    assert "refusing to apply" in msg and "before any change" in msg and "0002_t_idx.sql" in msg
    assert "connection pooler" in msg and "migrate_direct_url" in exc.value.fields["next_command"]
    assert exc.value.fields["route"]["pooled"] is True
    # Not even the transactional 0001 before it: the refusal comes before any change.
    assert history(empty_db) == [] and one(empty_db, "SELECT to_regclass('public.t') IS NULL")
    assert [e[2] for e in events(empty_db, "apply")] == ["refused"]
    assert one(empty_db, "SELECT count(*) FROM migrations.lock") == 0
    # The rehearsal (--check) says the real run would refuse, and writes nothing.
    problem = engine.nontx_route_problem(url, load(d))
    assert problem is not None and "migrate_direct_url" in problem.fields["next_command"]
    # Transactional files alone are fine through the pooler (everything is SET LOCAL).
    res = engine.apply(url, load(d), target="0001", run_id="via-bouncer")
    assert [a["version"] for a in res["applied"]] == ["0001"]


def test_with_direct_url_no_transaction_files_run_direct_and_leave_no_setting_behind(tmp_path, bouncer, empty_db):
    d = write_set(tmp_path / "m", SET_WITH_INDEX)
    url = bouncer(dbname(empty_db))
    res = engine.apply(url, load(d), run_id="split-route", direct_url=empty_db, advice=PlaybookAdvice("staging"))
    assert [a["version"] for a in res["applied"]] == ["0001", "0002", "0003"]
    assert one(empty_db, "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_i_idx'::regclass")
    # The file's own plain SET ended with its connection: 0003 (the runner's connection) saw the default.
    assert one(empty_db, "SELECT mwm FROM seen") != "77MB"
    # Nothing the engine set reached PgBouncer's server connections.
    for _ in range(4):
        assert q(url, "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),"
                      " current_setting('maintenance_work_mem')")[0] == ("0", "0", "64MB")
    # revert uses the same route for a no-transaction down script.
    with pytest.raises(LedgerError, match="connection pooler"):
        engine.revert(url, load(d), "0001", run_id="split-route")
    assert history(empty_db) == ["0001", "0002", "0003"]
    rev = engine.revert(url, load(d), "0001", run_id="split-route", direct_url=empty_db)
    assert [x["version"] for x in rev["reverted"]] == ["0003", "0002"] and history(empty_db) == ["0001"]
    assert one(empty_db, "SELECT to_regclass('public.t_i_idx') IS NULL")


def test_a_direct_url_to_another_database_is_refused(tmp_path, bouncer, pg_cluster, empty_db):
    d = write_set(tmp_path / "m", SET_WITH_INDEX)
    other_name = pg_cluster.create_db()
    try:
        with pytest.raises(LedgerError) as exc:
            engine.apply(bouncer(dbname(empty_db)), load(d), direct_url=pg_cluster.url(other_name), advice=PlaybookAdvice("staging"))
    finally:
        pg_cluster.drop_db(other_name)
    assert "does not reach the same database" in exc.value.msg
    assert one(empty_db, "SELECT to_regclass('migrations.history') IS NULL AND to_regclass('public.t') IS NULL")


def test_the_modules_rehearsal_says_the_real_run_would_refuse(tmp_path, bouncer, empty_db):
    from test_engine_module import FakeModule, _run

    d = write_set(tmp_path / "m", SET_WITH_INDEX)
    url = bouncer(dbname(empty_db))
    with pytest.raises(LedgerError) as exc:
        _run(FakeModule(check_mode=True, database_url=url, migrations_dir=str(d)))
    assert "every file would apply, but the real run would refuse" in exc.value.msg
    assert "migrate_direct_url" in exc.value.fields["next_command"]
    assert [r["status"] for r in exc.value.fields["rehearsal"]] == ["would_apply"] * 3
    ok = _run(FakeModule(check_mode=True, database_url=url, migrations_dir=str(d),
                         direct_url=empty_db))
    assert ok["changed"] is True and "rolled back, nothing written" in ok["msg"]
    assert one(empty_db, "SELECT to_regclass('migrations.history') IS NULL")  # --check wrote nothing
