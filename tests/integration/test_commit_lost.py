"""A connection lost during COMMIT: the engine finds the truth before it answers, and records one outcome.

A real TCP proxy (dropping_proxy.py) sits between the engine and PostgreSQL. On the connection
whose transaction ran the marked migration, it forwards the COMMIT and then drops the client side
at once: the server goes on committing (a deferred constraint trigger makes
the commit take about a second), the engine sees the connection die without a reply.
"""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_engine as engine
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import PlaybookAdvice

import pytest
from dropping_proxy import DroppingProxy
from ledgertest import load, write_set
from test_engine import events, history


@pytest.fixture
def proxy(pg_cluster):
    p = DroppingProxy(pg_cluster.port, drop="commit")
    yield p
    p.close()


def _slow_commit_set(tmp_path, fail):
    """0001 creates a deferred constraint trigger that sleeps 1 s at COMMIT (and then raises, when `fail`)."""
    body = "PERFORM pg_sleep(1);%s RETURN NULL;" % (
        " RAISE EXCEPTION 'deferred check failed at commit';" if fail else "")
    return write_set(tmp_path / "m", {
        "0001_slow_commit.sql": """
            CREATE TABLE marked (note text);
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN %s END $$;
            CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON marked DEFERRABLE INITIALLY DEFERRED
                FOR EACH ROW EXECUTE FUNCTION slow_commit();
            INSERT INTO marked VALUES ('commit_lost_marker');
        """ % body,
    })


def _via(url, port):
    """The same database reached through the proxy (no TLS or GSS negotiation: plain protocol)."""
    head, db = url.rsplit("/", 1)
    return "%s:%d/%s?sslmode=disable&gssencmode=disable" % (head.rsplit(":", 1)[0], port, db)


def test_a_commit_that_happened_after_the_connection_dropped_is_reported_applied(tmp_path, empty_db, proxy):
    d = _slow_commit_set(tmp_path, fail=False)
    res = engine.apply(_via(empty_db, proxy.port), load(d), advice=PlaybookAdvice("testenv"))
    assert proxy.fired.is_set()
    assert [a["version"] for a in res["applied"]] == ["0001"]
    assert "confirmed by the history" in res["applied"][0]["note"]
    assert history(empty_db) == ["0001"]
    # One outcome: the apply event of the commit, no 'failed' event beside it.
    outcomes = [e[2] for e in events(empty_db, "apply")]
    assert outcomes == ["ok"], outcomes


def test_a_commit_that_failed_after_the_connection_dropped_is_reported_not_applied(tmp_path, empty_db, proxy):
    d = _slow_commit_set(tmp_path, fail=True)
    with pytest.raises(LedgerError) as exc:
        engine.apply(_via(empty_db, proxy.port), load(d), advice=PlaybookAdvice("testenv"))
    assert proxy.fired.is_set()
    msg = exc.value.msg
    assert "connection was lost during COMMIT; the session that ran it has ended" in msg and "not applied" in msg
    assert msg.count("not applied") == 1 and "0001_slow_commit.sql" in msg
    # No SQLSTATE came back: said so, not "SQLSTATE ?".
    assert "SQLSTATE ?" not in msg and "no SQLSTATE: the connection to the server was lost (" in msg
    assert history(empty_db) == []
    outcomes = [e[2] for e in events(empty_db, "apply")]
    assert outcomes == ["failed"], outcomes
