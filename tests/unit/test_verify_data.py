"""Verify's knowledge of the schema is data beside the migrations (NNNN_name.verify.json); no database."""

from __future__ import annotations

import json
import shutil

import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import LedgerError
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_behaviour import Behaviour
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_verify_schema import Expectations
from ledgertest import MIGRATIONS, UPS, VERSIONS


def test_every_migration_of_the_set_says_what_it_must_have():
    exp = Expectations.load(MIGRATIONS)
    assert list(exp.known_versions) == VERSIONS
    assert [exp.files[v] for v in VERSIONS] == [p.name for p in UPS]
    assert exp.tenant_tables == ["public.credit_lots", "public.lot_entries", "public.crypto_payments",
                                 "public.usage_events"]
    # The balances are written by the database under RLS; the reconciler's cursor is a service's table.
    assert exp.rls_tables == ["public.credit_lots", "public.lot_entries", "public.credit_lot_balances",
                              "public.crypto_payments", "public.usage_events"]
    assert exp.service_tables == ["public.reconciliation_cursor"]
    assert exp.views == {"public.lot_balances"} and exp.guard_function == "public.prevent_mutation"
    assert exp.app_privileges["public.lot_balances"] == {"SELECT"}
    assert exp.version_of("public.usage_events") == "0011" and exp.version_of("app") == "0008"
    for rel, columns in exp.columns.items():
        assert columns, rel
    for behaviours in exp.behaviours.values():
        for name in behaviours:  # every behaviour named in the data is one the verifier implements
            assert callable(getattr(Behaviour, name, None)), name


def test_a_new_guarantee_is_a_data_edit(tmp_path):
    shutil.copytree(MIGRATIONS, tmp_path / "m")
    path = tmp_path / "m" / "0011_usage_events_pg.verify.json"
    spec = json.loads(path.read_text())
    spec["relations"]["public.usage_events"]["columns"]["settled_at"] = "timestamp with time zone"
    path.write_text(json.dumps(spec))
    exp = Expectations.load(tmp_path / "m")
    assert ("settled_at", "timestamp with time zone") in exp.columns["public.usage_events"]


@pytest.mark.parametrize("text", ["{not json", '{"version": "0012"}', "[]"])
def test_a_broken_verify_file_is_refused_with_its_name(tmp_path, text):
    (tmp_path / "0011_usage_events_pg.verify.json").write_text(text)
    with pytest.raises(LedgerError, match="0011_usage_events_pg.verify.json"):
        Expectations.load(tmp_path)
