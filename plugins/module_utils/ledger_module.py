# -*- coding: utf-8 -*-
"""The one tail of every ledger_* module: validate, run, redact once, exit.

A module defines ARGUMENT_SPEC (and SPEC_OPTIONS), a run(params, check_mode) that returns
its result or raises LedgerError, and then only:

    def result_of(params, check_mode=False):
        return module_result("ledger_x", run, params, check_mode)

    def main():
        run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)

module_result() never raises: a LedgerError becomes failed=True with its structured
fields (target filled in), a PostgreSQL error its SQLSTATE, anything else one line that
names the module and the target. Every string of the result passes the redaction here,
once, whichever path produced it; main() and the action plugin hand on the same dict.
"""

from __future__ import annotations

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError,
    describe_target,
    format_pg_error,
    pg_error,
    redact_obj,
)
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import use_run_options

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None

UNEXPECTED = "{name} failed unexpectedly on {target}: {error}: {detail} (a bug: please report it with this message)"


def with_defaults(argument_spec, params):
    """params over the argument spec's defaults (for callers that pass only some of them)."""
    out = dict((k, v.get("default")) for k, v in argument_spec.items())
    out.update(dict((k, v) for k, v in (params or {}).items() if v is not None))
    return out


def to_json(obj):
    """JSON-safe copy of a result (objects with to_dict() become dicts, anything else its str)."""
    return json.loads(json.dumps(obj, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o)))


def module_result(name, run, params, check_mode=False, on_failure=None, unexpected=UNEXPECTED,
                  unexpected_fields=None):
    """The result of run(params, check_mode) as the module returns it, failures included; never raises.

    on_failure(result, params, check_mode) may complete a LedgerError's result (ledger_migrate says
    whether a failed apply changed the target); ``unexpected`` words an internal error.
    """
    target = describe_target(params["database_url"])
    # Every next command built during this call carries the run's -i/-l/-e (ledger_next).
    use_run_options(params.get("run_options"))
    try:
        result = to_json(run(params, check_mode))
        if result.pop("failed", False):
            result["failed"] = True
    except LedgerError as exc:
        fields = to_json(exc.fields)
        fields.setdefault("target", target)
        fields.pop("failed", None)
        result = dict(fields, failed=True, msg=exc.msg)
        if on_failure is not None:
            result = on_failure(result, params, check_mode)
    except Exception as exc:  # noqa: BLE001 - an operator gets a message, never a traceback
        if psycopg2 is not None and isinstance(exc, psycopg2.Error):
            err = pg_error(exc)
            result = dict(failed=True, target=target, sqlstate=err["sqlstate"],
                          msg="%s failed on %s: %s" % (name, target, format_pg_error(err)))
        else:
            result = dict(unexpected_fields or {}, failed=True, target=target,
                          msg=unexpected.format(name=name, target=target, error=type(exc).__name__, detail=exc))
    finally:
        use_run_options(None)
    return redact_obj(result)


def run_module(argument_spec, result_of, spec_options=None):
    """main() of a ledger_* module: AnsibleModule's validation, result_of(), exit_json or fail_json."""
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True, **(spec_options or {}))
    result = result_of(module.params, check_mode=module.check_mode)
    if result.pop("failed", False):
        module.fail_json(**result)
    module.exit_json(**result)
