"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent


def load_module(name: str, prefix: str = "test_"):
    """plugins/modules/<name>.py as a Python module, to call its functions directly."""
    spec = importlib.util.spec_from_file_location(prefix + name, ROOT / "plugins" / "modules" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
