"""What a lost connection is said as (ledger_lost): each cause, each state, never "SQLSTATE ?"."""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_lost
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError, format_pg_error

LIBPQ = ("server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally\n"
         "\tbefore or while processing the request.\n")
ADVICE = "the migration was rolled back (one transaction: nothing of 0002_x.sql is applied)"


def facts(**kw):
    base = {"cause": "terminated", "pid": 4242, "ended": True, "waited_s": 0.0, "error": None, "restarted_at": None}
    base.update(kw)
    return base


def test_no_sqlstate_is_said_as_a_lost_connection_without_libpqs_guess():
    assert ledger_lost.header(LIBPQ) == \
        "no SQLSTATE: the connection to the server was lost (server closed the connection unexpectedly)"
    assert format_pg_error({"sqlstate": None, "message": LIBPQ, "lost": True}).startswith("no SQLSTATE: the connection")
    assert format_pg_error({"sqlstate": None, "message": "x"}) == \
        "no SQLSTATE (an error of the client library, not of the server): x"
    assert format_pg_error({"sqlstate": "22012", "message": "division by zero"}) == "SQLSTATE 22012: division by zero"


def test_each_cause_is_told_apart():
    assert "the server restarted at 2026-11-30 22:00:00 UTC" in ledger_lost.cause(
        facts(cause="restart", restarted_at="2026-11-30 22:00:00 UTC"))
    assert "(pid 4242) had already ended" in ledger_lost.cause(facts()) and "57P01" in ledger_lost.cause(facts())
    assert "was still running when the engine reconnected" in ledger_lost.cause(
        facts(cause="dropped", ended=True, waited_s=2.5)) and "it ended 2.5s later" in ledger_lost.cause(
        facts(cause="dropped", ended=True, waited_s=2.5))
    assert "it is still running after 120.0s" in ledger_lost.cause(facts(cause="dropped", ended=False, waited_s=120.0))
    assert ledger_lost.cause(facts(cause="unreachable", ended=None, error="cannot connect to t: refused")) == \
        "the target could not be reached again to find out why: cannot connect to t: refused"


def test_the_state_says_only_what_was_found():
    assert ledger_lost.state(facts(), ADVICE, True, "0002_x.sql").endswith(
        "; found after reconnecting: the session that ran it has ended")
    running = ledger_lost.state(facts(cause="dropped", ended=False), ADVICE, True, "0002_x.sql")
    assert "no COMMIT was sent" in running and "`SELECT pg_terminate_backend(4242)`" in running
    unknown = ledger_lost.state(facts(cause="unreachable", ended=None), ADVICE, True, "0002_x.sql")
    assert "could not be read again to confirm it" in unknown
    nontx = ledger_lost.state(facts(), "statements before it stay", False, "0003_idx.sql", 4)
    assert "the statement at line 4 of 0003_idx.sql ran outside a transaction: it may have completed" in nontx


def test_an_unreachable_target_is_a_fact_not_a_crash():
    def reconnect():
        raise LedgerError("cannot connect to u@h:5432/db: refused")
    found = ledger_lost.find_out(reconnect, 4242, "2026-11-30 21:00:00+00", 1.0, lambda *_a: True)
    assert found["cause"] == "unreachable" and found["ended"] is None and "refused" in found["error"]
