"""After migrate.yml converged with pgbouncer_url set: verify passed through PgBouncer."""

import json

DIRECT = "postgresql://postgres@127.0.0.1:55651/ledger"
POOLED = "postgresql://postgres@127.0.0.1:55652/ledger"
ADMIN = "postgresql://postgres@127.0.0.1:55652/pgbouncer"


def sql(host, url, query):
    cmd = host.run("psql %s -X -At -v ON_ERROR_STOP=1 -c %s", url, query)
    assert cmd.rc == 0, cmd.stderr
    return cmd.stdout.strip()


def test_pgbouncer_is_in_transaction_mode(host):
    config = dict(line.split("|", 2)[:2] for line in sql(host, ADMIN, "SHOW CONFIG").splitlines())
    assert config["pool_mode"] == "transaction"


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
