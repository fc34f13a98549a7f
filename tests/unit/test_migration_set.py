"""The migration set (ledger_migration_set) and this project's own set; no database."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import (
    parse_directives,
)

from ledgertest import BASIC, ROOT, UPS, VERSIONS, down_of, load, write_set


def squawk(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "squawk"), "--reporter", "gcc", *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)


def test_load_migration_set_orders_checksums_and_pairs_down_scripts(tmp_path):
    d = write_set(tmp_path / "m", dict(BASIC, **{"README.md": "not sql"}))
    ms = load(d)
    assert [m.version for m in ms] == ["0001", "0002", "0003"]
    m = ms[0]
    assert m.name == "accounts" and m.filename == "0001_accounts.sql"
    assert m.checksum == hashlib.sha256((d / "0001_accounts.sql").read_bytes()).hexdigest()
    assert m.down_path == str(d / "0001_accounts.down.sql")
    assert m.transactional is True
    assert [s.line for s in m.statements] == [2, 3]


@pytest.mark.parametrize("files,needle", [
    ({"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 2;"}, "duplicate version 0001"),
    ({"1_a.sql": "SELECT 1;"}, "1_a.sql: a migration file is named NNNN_name.sql"),
    ({"0001-a.sql": "SELECT 1;"}, "0001-a.sql"),
    ({"0001_a.sql": "SELECT 1;", "0001_b.down.sql": "SELECT 2;"}, "does not match its up migration"),
    ({"0001_a.sql": "-- ledger:no-transactions\nSELECT 1;"}, "unknown directive 'ledger:no-transactions'"),
    ({"0001_a.sql": "SELECT 1;\n-- ledger:no-transaction\nSELECT 2;"}, "must be in the header"),
    ({"0001_a.sql": "BEGIN;\nCREATE TABLE t (i int);\nCOMMIT;"}, "line 1: transaction control (BEGIN)"),
    ({"0001_a.sql": "CREATE TABLE t (i int);\n\\echo hi\n"}, "line 2: psql meta-commands"),
    ({"0001_a.sql": 'CREATE TABLE "a\\b" (i int);\nSELECT 1 \\gset\n'}, "line 2: psql meta-commands"),
    ({"0001_a.sql": "CREATE TABLE t (i int);\nCREATE INDEX CONCURRENTLY t_i ON t (i);"},
     "line 2: CONCURRENTLY can't run inside a transaction block"),
    ({"0001_a.sql": "VACUUM;"}, "VACUUM can't run inside a transaction block"),
    ({"0001_a.sql": "-- only a comment\n"}, "contains no SQL statement"),
    ({"0001_a.sql": "SELECT 1;\nSELECT 'x;\n"}, "0001_a.sql line 2: unterminated quoted string"),
])
def test_load_migration_set_refuses_a_bad_set(tmp_path, files, needle):
    d = write_set(tmp_path / "m", files)
    with pytest.raises(LedgerError) as exc:
        load(d)
    assert needle in exc.value.msg


def test_a_backslash_in_a_quoted_name_or_a_string_is_sql(tmp_path):
    d = write_set(tmp_path / "m", {"0001_a.sql": 'CREATE TABLE "back\\slash ""t""" (i int);\n'
                                                 "COMMENT ON TABLE \"back\\slash \"\"t\"\"\" IS E'a\\\\b';\n"})
    [m] = load(d)
    assert [s.line for s in m.statements] == [1, 2]


def test_down_scripts_are_never_up_migrations_and_the_directive_is_read(tmp_path):
    d = write_set(tmp_path / "m", {
        "0001_a.sql": "SELECT 1;",
        "0002_b.down.sql": "SELECT 2;",  # a down script whose up file is gone
        "0003_idx.sql": """
            -- An index built without blocking writes.
            -- ledger:no-transaction
            CREATE INDEX CONCURRENTLY IF NOT EXISTS t_i ON t (i);
        """,
    })
    ms = load(d)
    assert [m.filename for m in ms] == ["0001_a.sql", "0003_idx.sql"]
    assert ms[1].transactional is False
    assert "0002" in ms.orphan_downs and ms.down_for("0002")[1] == "0002_b.down.sql"
    # A comment that merely mentions the directive later in a statement's text is not a directive.
    assert parse_directives("SELECT '-- ledger:no-transaction';\n", "x.sql") == []


def test_the_set_is_0008_to_0011_each_with_a_down_script_and_a_header():
    assert [p.name[:4] for p in UPS] == VERSIONS
    for up in UPS:
        down = down_of(up)
        assert down.is_file(), f"{up.name} has no {down.name}"
        for path in (up, down):
            head = path.read_text().splitlines()[:3]
            assert head[0].startswith("-- ====") and path.name in head[1], f"{path.name}: no header comment"
        code = "\n".join(line for line in up.read_text().splitlines() if not line.lstrip().startswith("--"))
        assert "IF NOT EXISTS" not in code.upper(), f"{up.name}: a conflict must fail (42P07), not be skipped"


def test_squawk_is_clean_over_the_up_scripts():
    res = squawk(*UPS)
    assert res.returncode == 0, res.stdout + res.stderr


def test_squawk_still_flags_a_blocking_change(tmp_path):
    # Control: the configuration switches off only what it justifies. An index built
    # without CONCURRENTLY on an existing table, an unqualified table, a 32-bit
    # amount: all still reported.
    bad = tmp_path / "0012_bad.sql"
    bad.write_text("CREATE INDEX credit_lots_status_idx ON public.credit_lots (status);\n"
                   "CREATE TABLE t (id bigint PRIMARY KEY, amount integer);\n")
    res = squawk(bad)
    assert res.returncode != 0
    for rule in ("require-concurrent-index-creation", "require-table-schema", "prefer-bigint-over-int"):
        assert rule in res.stdout, res.stdout


@pytest.mark.parametrize("content,line,needle", [
    (b"SELECT 1;\nALTER TABLE t ENABLE ROW LEVEL SECURITY\x00, FORCE ROW LEVEL SECURITY;\n", 2, "NUL"),
    (b"SELECT 1;\n\nSELECT 2\x1b[0m;\n", 3, "0x1B"),
    (b"SELECT 1;\x0c\n", 1, "0x0C"),
    (b"SELECT 1;\n\xef\xbb\xbfSELECT 2;\n", 2, "byte-order mark"),
])
def test_control_characters_are_refused_with_file_and_line(tmp_path, content, line, needle):
    d = tmp_path / "m"
    d.mkdir()
    (d / "0001_a.sql").write_bytes(content)
    with pytest.raises(LedgerError) as err:
        load(d)
    assert err.value.fields["file"] == "0001_a.sql" and err.value.fields["line"] == line
    assert err.value.msg.startswith("0001_a.sql line %d: " % line) and needle in err.value.msg


def test_a_leading_bom_is_dropped_and_never_hides_transaction_control(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "0001_a.sql").write_bytes(b"\xef\xbb\xbfCREATE TABLE t (id int);\n\tSELECT 1;\r\n")
    ms = load(d)
    assert [s.line for s in ms[0].statements] == [1, 2]
    assert not ms[0].statements[0].text.startswith("\ufeff")
    assert ms[0].checksum == hashlib.sha256((d / "0001_a.sql").read_bytes()).hexdigest()
    (d / "0001_a.sql").write_bytes(b"\xef\xbb\xbfBEGIN;\nCREATE TABLE t (id int);\nCOMMIT;\n")
    with pytest.raises(LedgerError) as err:
        load(d)
    assert "transaction control (BEGIN)" in err.value.msg and err.value.fields["line"] == 1
