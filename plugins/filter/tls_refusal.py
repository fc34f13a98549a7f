# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TLS rule of an environment for the playbooks (playbooks/tasks/require_tls.yml).

The rule and its wording live in Target (module_utils/ledger_target.py), the one parser of a
database URL: this filter only hands it a URL, so a playbook applies exactly what the modules
apply, with libpq's own reading of the URL (not a regex over it).
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: tls_refusal
short_description: Why a database URL does not meet the sslmode an environment requires (empty when it does)
version_added: "1.1.0"
description:
  - "Parses the URL once with libpq's parser (the collection's Target) and applies the rule of
    C(ledger_require_sslmode): the URL itself must ask for that sslmode (PGSSLMODE does not count)."
  - A URL that cannot be parsed is refused with the parser's advice, never with the URL.
positional: required, who
options:
  _input:
    description: The database URL (libpq URI).
    type: str
    required: true
  required:
    description: The sslmode the environment requires; empty requires nothing.
    type: str
    required: true
  who:
    description: How the target is named in the refusal (host and environment).
    type: str
    required: true
author: Arrakis platform team (@arrakis-platform)
"""

EXAMPLES = r"""
- name: Refuse a database_url without the TLS mode this environment requires
  ansible.builtin.assert:
    that: __refusal | length == 0
    fail_msg: "{{ __refusal }}"
  vars:
    __refusal: "{{ database_url | arrakis.ledger.tls_refusal(ledger_require_sslmode, inventory_hostname) }}"
"""

RETURN = r"""
_value:
  description: The refusal, or an empty string when the URL meets the rule.
  type: str
"""

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_errors import LedgerError
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import Target


def tls_refusal(url, required, who):
    """The refusal text of Target.sslmode_refusal, '' when the URL meets the rule."""
    if not required:
        return ""
    try:
        target = Target(url)
    except LedgerError as exc:  # its message never shows the URL
        return "%s requires sslmode=%s, but %s" % (who, required, exc.msg)
    return target.sslmode_refusal(required, who) or ""


class FilterModule(object):
    """arrakis.ledger.tls_refusal."""

    def filters(self):
        return {"tls_refusal": tls_refusal}
