"""The one file-name rule (ledger_migration_set.parse_filename), as the engine, precheck and promotion use it."""

from __future__ import annotations

import importlib

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import (
    load_migration_set,
    parse_filename,
    up_files,
)

promotion = importlib.import_module("ansible_collections.arrakis.ledger.plugins.modules.ledger_promotion")


@pytest.mark.parametrize("name,parsed", [
    ("0008_tenant_context_guard.sql", ("up", "0008", "tenant_context_guard")),
    ("0008_tenant_context_guard.down.sql", ("down", "0008", "tenant_context_guard")),
    ("0012_add-index.sql", None),
    ("12_short.sql", None),
    ("0012_.sql", None),
    ("0012_x.SQL", None),
])
def test_parse_filename(name, parsed):
    assert parse_filename(name) == parsed


def test_engine_and_promotion_agree_on_a_name_outside_the_rule(tmp_path):
    (tmp_path / "0011_ok.sql").write_text("SELECT 1;\n")
    (tmp_path / "0012_add-index.sql").write_text("SELECT 1;\n")
    with pytest.raises(LedgerError, match="0012_add-index.sql: a migration file is named NNNN_name.sql"):
        load_migration_set(tmp_path)
    with pytest.raises(LedgerError, match="0012_add-index.sql: a migration file is named NNNN_name.sql"):
        up_files(str(tmp_path))
    with pytest.raises(LedgerError, match="0012_add-index.sql"):
        promotion.migration_set(str(tmp_path))


def test_up_files_are_the_engines_checksums_in_order(tmp_path):
    (tmp_path / "0002_b.sql").write_text("SELECT 2;\n")
    (tmp_path / "0001_a.sql").write_text("SELECT 1;\n")
    (tmp_path / "0001_a.down.sql").write_text("SELECT 0;\n")
    (tmp_path / "README.md").write_text("not a migration\n")
    engine_view = [(m.version, m.filename, m.checksum) for m in load_migration_set(tmp_path)]
    assert up_files(str(tmp_path)) == engine_view == promotion.migration_set(str(tmp_path))
    assert [v for v, _f, _s in up_files(str(tmp_path), up_to="0001")] == ["0001"]
