"""The one target contract (plugins/module_utils/ledger_target.py): libpq's parser, refusals, names, secrets.

No database: these are the rules every module, the callback and the reports rely on.
"""

from __future__ import annotations

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    describe_target,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import (
    Target,
    target_name,
)


def test_a_raw_at_in_the_password_is_refused_before_anything_is_shown():
    url = "postgresql://migrator:Sec@ret9@db.example:5432/ledger"
    with pytest.raises(LedgerError) as exc:
        Target(url)
    msg = exc.value.msg
    assert "percent-encode" in msg and "%40" in msg
    for piece in ("Sec", "ret9", "migrator", "db.example", "ledger"):
        assert piece not in msg, piece
    assert describe_target(url) == target_name(url) == "<unusable database_url>"


def test_the_same_password_percent_encoded_is_parsed_by_libpq():
    t = Target("postgresql://migrator:Sec%40ret9@db.example:6543/ledger?sslmode=verify-full")
    assert t.name == "migrator@db.example:6543/ledger"
    assert t.password == "Sec@ret9" and t.params["password"] == "Sec@ret9"
    assert t.secrets() == {"Sec@ret9", "Sec%40ret9"}
    assert t.tls and t.meets_sslmode("verify-full") and not t.meets_sslmode("require")
    assert "Sec" not in repr(t) + str(t)


@pytest.mark.parametrize("url,hidden", [
    ("postgresql://u:pa/ss@h/db", "ss@h"),   # a raw '/': libpq reads the port out of the password
    ("postgresql://u:pw@h:notaport/db", "notaport"),
    ("postgresql://u:pw@h/db?sslmode=require&junk", "junk"),
])
def test_what_libpq_cannot_use_is_refused_without_echo(url, hidden):
    with pytest.raises(LedgerError) as exc:
        Target(url)
    assert "percent-encode" in exc.value.msg and "not shown" in exc.value.msg
    assert hidden not in exc.value.msg and "pw" not in exc.value.msg


@pytest.mark.parametrize("url,msg", [
    ("", "empty"), (None, "empty"), ("host=h dbname=d", "postgresql://"), ("mysql://u@h/d", "postgresql://"),
])
def test_not_a_libpq_uri(url, msg):
    with pytest.raises(LedgerError, match=msg):
        Target(url)


def test_defaults_come_from_libpq_rules():
    t = Target("postgresql:///ledger?host=/var/run/postgresql&user=app")
    assert (t.host, t.port, t.user, t.dbname) == ("/var/run/postgresql", 5432, "app", "ledger")
    assert not t.tls and t.meets_sslmode("") and t.secrets() == set()


def test_another_database_of_the_same_target_keeps_credentials_and_query():
    t = Target("postgresql://u:p%2Fw@h:5433/ledger?sslmode=require").with_database("ledger_restore_1")
    assert t.name == "u@h:5433/ledger_restore_1" and t.password == "p/w" and t.sslmode == "require"
    assert t.url_without_password() == "postgresql://u@h:5433/ledger_restore_1?sslmode=require"


def test_secrets_of_hides_even_what_target_refuses():
    from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import (
        secrets_of,
    )

    assert secrets_of("postgresql://m:Sec%40ret9@h/db") == {"Sec@ret9", "Sec%40ret9"}
    assert "Sec@ret9" in secrets_of("postgresql://m:Sec@ret9@h/db")
    assert secrets_of("postgresql://m@h/db") == set() and secrets_of("https://u:p@h/") == set()
    assert secrets_of(None) == set()


def test_the_tls_rule_is_one_rule_for_the_modules_and_the_playbooks():
    from ansible_collections.arrakis.ledger.plugins.filter.tls_refusal import tls_refusal
    who = "db1 (production)"
    assert Target("postgresql://u@h/db?sslmode=verify-full").sslmode_refusal("verify-full", who) is None
    assert tls_refusal("postgresql://u@h/db?sslmode=verify-full", "verify-full", who) == ""
    assert tls_refusal("postgresql://u@h/db", "", who) == ""  # nothing required
    said = tls_refusal("postgresql://u:pw@h/db?sslmode=require", "verify-full", who)
    assert said == Target("postgresql://u:pw@h/db?sslmode=require").sslmode_refusal("verify-full", who)
    assert said.startswith("db1 (production) requires sslmode=verify-full, but its database_url has sslmode=require.")
    assert "sslmode=unset" in tls_refusal("postgresql://u@h/db", "verify-full", who)
    # libpq's reading, not a regex: a sslmode in the password or the fragment is no sslmode.
    assert "sslmode=unset" in tls_refusal("postgresql://u:sslmode%3Dverify-full@h/db", "verify-full", who)
    # A URL Target refuses is refused without showing any of it.
    raw = tls_refusal("postgresql://u:Zq7@Wx9k@h/db?sslmode=verify-full", "verify-full", who)
    assert raw.startswith("db1 (production) requires sslmode=verify-full, but database_url is malformed")
    assert "Zq7" not in raw and "Wx9k" not in raw
