"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[2]


def load_module(name: str, prefix: str = "test_"):
    """The module arrakis.ledger.ledger_<name> as a Python module, to call its functions directly."""
    del prefix
    return importlib.import_module("ansible_collections.arrakis.ledger.plugins.modules." + name)


def q(url: str, query: str, args=None):
    """Run one statement in autocommit; the rows when it returns any, else None."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def history(url: str) -> list[str]:
    """The applied versions recorded in migrations.history, in order."""
    return [r[0] for r in q(url, "SELECT version FROM migrations.history ORDER BY version")]


def events(url: str, columns: str = "action, outcome, run_id", action: str | None = None) -> list[tuple]:
    """migrations.events rows in order (only `action`'s when given); [] when the records schema does not exist."""
    if q(url, "SELECT to_regclass('migrations.events') IS NOT NULL")[0][0] is not True:
        return []
    where = " WHERE action = %s" if action else ""
    return q(url, "SELECT %s FROM migrations.events%s ORDER BY id" % (columns, where), (action,) if action else None)


def other_sessions(url: str, keep=()) -> list[int]:
    """Pids of the other sessions on url's database, except `keep`, once closed ones have ended.

    A client that closed its connection leaves a backend that exits a moment later; on a loaded
    machine pg_stat_activity still lists it. Waiting (up to 30 s) for those to go keeps tests
    exact without guessing a delay: a session that really stays open is still returned.
    """
    deadline = time.monotonic() + 30
    while True:
        rows = q(url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                      " AND pid <> pg_backend_pid() AND NOT (pid = ANY(%s)) ORDER BY pid", (list(keep),))
        pids = [r[0] for r in rows]
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)
