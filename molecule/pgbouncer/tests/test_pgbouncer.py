"""After migrate.yml converged with pgbouncer_url set: verify passed through PgBouncer."""

import os
import json

from ledgertest import shipped_versions

PORT_BASE = int(os.environ.get("LEDGER_MOLECULE_PORT_BASE", "55600"))
DIRECT = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 51}/ledger"
POOLED = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 52}/ledger"
ADMIN = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 52}/pgbouncer"


def sql(host, url, query):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", url, query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


def test_pgbouncer_is_in_transaction_mode(host):
    config = dict(line.split("|", 2)[:2] for line in sql(host, ADMIN, "SHOW CONFIG").splitlines())
    assert config["pool_mode"] == "transaction"
    # Guarantee 7: every server connection is reset after each client transaction.
    assert config["server_reset_query"] == "DISCARD ALL" and config["server_reset_query_always"] == "1"


def test_verify_passed_through_pgbouncer(host):
    row = json.loads(sql(host, DIRECT, "SELECT json_build_object('outcome', outcome, 'detail', detail)"
                                       " FROM migrations.events WHERE action = 'verify' ORDER BY id DESC LIMIT 1"))
    assert row["outcome"] == "passed"
    assert row["detail"]["pgbouncer"] is True and row["detail"]["failed"] == []


def test_context_is_transaction_local_through_pgbouncer(host):
    # Two statements, two transactions on the pooled connection: the second sees no tenant.
    out = host.run("psql %s -X -At -v VERBOSITY=verbose -c %s -c %s", POOLED,
                   "SELECT app.set_community_context('00000000-0000-0000-0000-000000000001')",
                   "SELECT app.current_community_id()")
    assert out.rc != 0 and "P0001" in out.stderr


RACE = f"postgresql://postgres@127.0.0.1:{PORT_BASE + 51}/ledger_race"


def test_migrations_went_through_pgbouncer(host):
    # The converge's migrate stage used migrate_database_url (PgBouncer): its history is complete.
    assert sql(host, DIRECT, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history") == \
        ",".join(shipped_versions())


def test_racing_runs_applied_each_migration_exactly_once(host):
    assert sql(host, RACE, "SELECT string_agg(version, ',' ORDER BY version) FROM migrations.history") == \
        ",".join(shipped_versions())
    applies = sql(host, RACE, "SELECT string_agg(version || ':' || n, ',' ORDER BY version) FROM"
                              " (SELECT version, count(*) AS n FROM migrations.events"
                              "  WHERE action = 'apply' AND outcome = 'ok' GROUP BY version) s")
    assert applies == ",".join(v + ":1" for v in shipped_versions())
    # Two distinct runs reached the database, and no lease is left behind.
    assert int(sql(host, RACE, "SELECT count(DISTINCT run_id) FROM migrations.events")) == 2
    assert sql(host, RACE, "SELECT count(*) FROM migrations.lock") == "0"
