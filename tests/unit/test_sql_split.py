"""SQL splitting (ledger_sql): statements, their file lines, refusals; no database."""

from __future__ import annotations

import textwrap

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
)

from ledgertest import engine, load, write_set


def test_split_sql_keeps_semicolons_inside_quotes_comments_and_bodies():
    sql = textwrap.dedent("""\
        -- a comment; with a semicolon
        SELECT 'a;''b' AS s;   /* block ; /* nested ; */ still comment ; */
        SELECT E'it\\'s; fine', "odd;name" FROM (SELECT 1 AS "odd;name") x;

        CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $fn$
        BEGIN
          PERFORM 1; -- inside the body
          RETURN 2;
        END
        $fn$;
        DO $$ BEGIN RAISE NOTICE 'x;y'; END $$;
        CREATE FUNCTION g() RETURNS int LANGUAGE sql
        BEGIN ATOMIC
          SELECT 1;
          SELECT CASE WHEN true THEN 2 ELSE 3 END;
        END;
        SELECT $1x$ignored$1x$ ;
        SELECT 1""")
    stmts = engine.split_sql(sql)
    starts = [s.line for s in stmts]
    assert [s.text.split()[0] for s in stmts] == ["SELECT", "SELECT", "CREATE", "DO", "CREATE", "SELECT", "SELECT"]
    assert starts[:6] == [2, 3, 5, 11, 12, 17]
    assert stmts[0].text == "SELECT 'a;''b' AS s"
    assert stmts[4].text.rstrip().endswith("END")
    # Masked text keeps the layout but blanks literals, so keyword checks ignore them.
    assert len(stmts[1].masked) == len(stmts[1].text) and "fine" not in stmts[1].masked
    assert stmts[2].dollar_lines == [5]


@pytest.mark.parametrize("sql,line", [
    ("SELECT 1;\nSELECT 'oops;\n", 2),
    ("SELECT 1;\n/* open /* nested */\nSELECT 2;\n", 2),
    ("SELECT 1;\n\nDO $x$ BEGIN END $y$;\n", 3),
    ('SELECT "never closed;\n', 1),
])
def test_split_sql_reports_the_line_of_an_unterminated_quote(sql, line):
    with pytest.raises(engine.SqlSyntaxError) as exc:
        engine.split_sql(sql)
    assert exc.value.line == line


def test_statement_line_at_maps_a_character_position_to_the_file_line():
    stmts = engine.split_sql("\n\n-- c\nSELECT 1,\n  2,\n  nope(3);\n")
    st = stmts[0]
    assert st.line == 4
    assert st.line_at(st.text.index("nope") + 1) == 6
    assert st.line_at(None) == 4


@pytest.mark.parametrize("files,needle", [
    ({"0001_a.sql": "SET search_path = app, public;\nCREATE TABLE t (i int);"},
     "0001_a.sql line 1: a session-level SET search_path outlives the migration's transaction"),
    ({"0001_a.sql": "CREATE TABLE t (i int);\n\n  SET SESSION statement_timeout = '1s';"},
     "0001_a.sql line 3: a session-level SET SESSION"),
    ({"0001_a.sql": "SET ROLE app_owner;"}, "line 1: a session-level SET ROLE"),
    ({"0001_a.sql": "SELECT 1;\nRESET ALL;"}, "line 2: a session-level RESET ALL"),
    ({"0001_a.sql": "SELECT 1;\nSELECT pg_catalog.set_config('search_path', 'x, y', false);"},
     "line 2: set_config(name, value, false) changes the session"),
    ({"0001_a.sql": "SELECT 1;", "0001_a.down.sql": "SET search_path = x;\nDROP TABLE t;"},
     "0001_a.down.sql line 1: a session-level SET search_path"),
    ({"0001_a.sql": "-- ledger:no-transaction\nSET LOCAL maintenance_work_mem = '1GB';\nVACUUM;"},
     "0001_a.sql line 2: SET LOCAL has no effect in a '-- ledger:no-transaction' file"),
])
def test_a_session_level_setting_is_refused_when_the_set_is_read(tmp_path, files, needle):
    d = write_set(tmp_path / "m", files)
    with pytest.raises(LedgerError) as exc:
        load(d)
    assert needle in exc.value.msg
    assert "SET LOCAL" in exc.value.msg and exc.value.fields["line"] == int(needle.split("line ")[1].split(":")[0])


@pytest.mark.parametrize("text, expected", [
    ('CREATE INDEX CONCURRENTLY IF NOT EXISTS "My ""Idx""" ON ONLY public."T x" (a)',
     {"action": "create", "index": 'My "Idx"', "schema": None, "table": 'public."T x"'}),
    ("create unique index concurrently Ix_A /* the key */ on ledger.entries using btree (a) where b > 1",
     {"action": "create", "index": "ix_a", "schema": None, "table": "ledger.entries"}),
    ("CREATE INDEX CONCURRENTLY on_x ON t(a)", {"action": "create", "index": "on_x", "schema": None, "table": "t"}),
    ('DROP INDEX CONCURRENTLY IF EXISTS "S"."a.b"', {"action": "drop", "index": "a.b", "schema": "S", "table": None}),
    ("drop index concurrently foo cascade", {"action": "drop", "index": "foo", "schema": None, "table": None}),
    ("CREATE INDEX CONCURRENTLY ON t (a)", None),  # the server picks the name
    ("CREATE INDEX ix ON t (a)", None),  # not concurrent: it runs in a transaction
    ("REINDEX INDEX CONCURRENTLY ix", None),  # what it leaves is INVALID _ccnew/_ccold indexes, listed anyway
])
def test_a_concurrent_index_statement_names_what_it_works_on(text, expected):
    """What a lost no-transaction statement is checked against once its session has ended (ledger_lost.effect)."""
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import concurrent_index
    assert concurrent_index(engine.split_sql(text)[0]) == expected
