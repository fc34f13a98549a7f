"""Production's view of staging's profile (module_utils/ledger_impact_policy.from_stamp), without a database.

The precheck reads production's own table sizes and weighs staging's observations at those
sizes; where a table's size differs from staging's by more than 10x (either way) it says so.
The end-to-end case (a 12x difference said by the precheck of a real production database) is
tests/integration/test_impact_promotion.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_impact_policy as policy

THRESHOLD = 1000


def staging_profile(rows, lock="SHARE", rows_read=None):
    """Staging's stamp: 0001_index.sql line 2 took ``lock`` on public.big (``rows`` rows) and read it."""
    return [{"version": "0001", "filename": "0001_index.sql", "allow_lock": [], "statements": [
        {"line": 2, "statement": "CREATE INDEX big_a ON public.big (a)", "ms": 40, "observed": True, "relations": [
            {"relation": "public.big", "kind": "table", "table": "public.big", "lock": lock, "rewrite": False,
             "rows_read": rows if rows_read is None else rows_read, "rows": rows, "rows_guessed": False,
             "size_bytes": rows * 40}]}]}]


PENDING = [SimpleNamespace(version="0001", filename="0001_index.sql", allow_lock=())]


@pytest.mark.parametrize("staging, here, said", [
    (5000, 60000, True),     # 12x more here
    (60000, 5000, True),     # 12x fewer here
    (5000, 50000, False),    # exactly 10x: not more than 10x
    (5000, 50001, True),
    (50, 900, False),        # 18x, but both tiny: sizes that small say nothing about a lock
    (0, 2000, True),         # empty on staging, 2000 rows here
])
def test_a_size_difference_beyond_10x_is_said_either_way(staging, here, said):
    _results, _heavy, differences = policy.from_stamp(staging_profile(staging), PENDING, {"public.big": here},
                                                      THRESHOLD)
    assert differences == ([{"table": "public.big", "staging_rows": staging, "rows": here}] if said else [])


def test_the_policy_weighs_production_sizes_and_staging_heavy_is_never_rehearsed():
    # Small on staging, large here: the impact is production's, and the statement is not rehearsed here.
    results, heavy, _d = policy.from_stamp(staging_profile(800, rows_read=800), PENDING, {"public.big": 60000},
                                           THRESHOLD)
    [rel] = results[0]["impact"][0]["relations"]
    assert (rel["rows"], rel["staging_rows"]) == (60000, 800)
    assert [(i["table"], i["rows"], i["lock"]) for i in policy.impacts(results, THRESHOLD)] == [
        ("public.big", 60000, "SHARE")]
    assert list(heavy) == [("0001_index.sql", 2)] and "SHARE lock on public.big (60000 rows here)" in heavy[
        ("0001_index.sql", 2)]
    # Large on staging, small here: no impact at production's size, but staging measured it heavy,
    # so it is still not rehearsed here (the stamp's measurement, not a guess, decides).
    results, heavy, _d = policy.from_stamp(staging_profile(60000), PENDING, {"public.big": 500}, THRESHOLD)
    assert policy.impacts(results, THRESHOLD) == []
    assert list(heavy) == [("0001_index.sql", 2)]
    # A brief strong lock (no work on the table) is heavy nowhere.
    results, heavy, _d = policy.from_stamp(staging_profile(60000, lock="ACCESS EXCLUSIVE", rows_read=0), PENDING,
                                           {"public.big": 60000}, THRESHOLD)
    assert policy.impacts(results, THRESHOLD) == [] and heavy == {}


def test_an_index_build_on_a_small_staging_table_is_heavy_on_a_large_production_one():
    """At the default threshold: staging's table (50,000 rows) is below it, production's (5,000,000) far above.

    The build read all of staging's table; weighed at production's size it reads all of
    production's: an impact, and never rehearsed on production (its rehearsal would hold SHARE
    on 5,000,000 rows for the whole build)."""
    results, heavy, differences = policy.from_stamp(staging_profile(50000), PENDING, {"public.big": 5000000}, 100000)
    [rel] = results[0]["impact"][0]["relations"]
    assert (rel["rows_read"], rel["staging_rows_read"]) == (5000000, 50000)
    assert [(i["table"], i["rows"]) for i in policy.impacts(results, 100000)] == [("public.big", 5000000)]
    assert list(heavy) == [("0001_index.sql", 2)]
    assert differences == [{"table": "public.big", "staging_rows": 50000, "rows": 5000000}]
