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


def _words(sql):
    [stmt] = split_sql(sql + ";\n")
    return impact.statement_words(stmt)


def test_words_leave_out_only_what_no_statement_runs_now():
    """A COMMENT's string and a PL/pgSQL body are not looked up; an SQL body and a DO block are."""
    plpgsql = ("CREATE OR REPLACE FUNCTION public.f() RETURNS trigger LANGUAGE plpgsql AS $$"
               " BEGIN UPDATE public.audit_rows SET n = n + 1; RETURN NEW; END $$")
    assert "audit_rows" not in _words(plpgsql) and {"public", "f"} <= _words(plpgsql)
    sql_body = "CREATE FUNCTION public.g() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM public.audit_rows $$"
    assert "audit_rows" in _words(sql_body)  # validated at creation: it reads the table's definition
    assert "audit_rows" in _words("DO $$ BEGIN UPDATE public.audit_rows SET n = 0; END $$")
    assert "audit_rows" in _words("CREATE FUNCTION public.h() RETURNS void LANGUAGE 'plpgsql' AS $$"
                                  " BEGIN DELETE FROM public.audit_rows; END $$")  # the language as a string: kept
    comment = "COMMENT ON TABLE public.orders IS 'copied from audit_rows nightly'"
    assert "audit_rows" not in _words(comment) and "orders" in _words(comment)
    assert 'Odd "T"' in _words('COMMENT ON TABLE "Odd ""T""" IS \'x\'')


@pytest.mark.parametrize("words, literal", [
    (set(), "{}"),
    (["a"], '{"a"}'),
    (["a b", "c,d"], '{"a b","c,d"}'),
    (['x"y', "back\\slash"], '{"x\\"y","back\\\\slash"}'),
])
def test_name_array_quotes_every_element(words, literal):
    assert impact.name_array(words) == literal
