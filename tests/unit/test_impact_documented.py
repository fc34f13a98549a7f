"""The documented lock levels of no-transaction statements (module_utils/ledger_impact.py), without a database."""

from __future__ import annotations

import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact as impact
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact_policy as policy
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_sql import split_sql


@pytest.mark.parametrize("sql, relation, lock, rewrite", [
    ("CREATE INDEX CONCURRENTLY i ON public.t (a)", "public.t", "SHARE UPDATE EXCLUSIVE", False),
    ('CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON ONLY "s"."T" (a)', "s.T", "SHARE UPDATE EXCLUSIVE", False),
    ("REINDEX INDEX CONCURRENTLY public.i", "public.i", "SHARE UPDATE EXCLUSIVE", False),
    ("DROP INDEX CONCURRENTLY IF EXISTS public.i", "public.i", "SHARE UPDATE EXCLUSIVE", False),
    ("VACUUM (FULL, ANALYZE) public.t", "public.t", "ACCESS EXCLUSIVE", True),
    ("VACUUM ANALYZE t", "public.t", "SHARE UPDATE EXCLUSIVE", False),
])
def test_documented_levels(sql, relation, lock, rewrite):
    [stmt] = split_sql(sql + ";\n")
    entry = impact.documented_profile(stmt, {})
    assert entry["observed"] is False and entry["note"].startswith("not observed")
    [rel] = entry["relations"]
    assert (rel["relation"], rel["lock"], rel["rewrite"]) == (relation, lock, rewrite)


def test_unknown_statement_says_so():
    [stmt] = split_sql("ALTER TYPE public.e ADD VALUE 'x';\n")
    entry = impact.documented_profile(stmt, {})
    assert entry["relations"] == [] and "no documented lock level" in entry["note"]


def test_the_policy_counts_a_documented_strong_lock_on_a_large_table():
    [stmt] = split_sql("VACUUM FULL public.t;\n")
    entry = impact.documented_profile(stmt, {})
    entry["relations"][0]["rows"] = 500000
    found = policy.impacts([{"filename": "0001_x.sql", "version": "0001", "impact": [entry]}], 100000)
    assert [(i["table"], i["lock"], i["rewrite"], i["observed"]) for i in found] == [
        ("public.t", "ACCESS EXCLUSIVE", True, False)]
