# -*- coding: utf-8 -*-
"""Shared base of the ledger_* action plugins: run the module in the worker process when it is safe.

Not an action plugin itself: plugins/action/ledger_<stage>.py import it by its collection path
and subclass LedgerAction.

Every ledger target runs on the control node (playbooks/group_vars/all.yml: ansible_connection
local, ansible_python_interpreter the controller's own Python). For such a task, packaging the
module with AnsiballZ and starting a new interpreter that imports ansible.module_utils.basic and
psycopg2 costs about 0.26 s; the module's work is often less. So when
  - the connection is local, without become, delegate_to or a task `environment`, not async, and
  - the task's ansible_python_interpreter resolves to this very Python (realpaths compared),
the plugin imports ansible_collections.arrakis.ledger.plugins.modules.<name>, validates the
arguments with ArgumentSpecValidator and the module's ARGUMENT_SPEC/SPEC_OPTIONS (the same
errors as AnsibleModule), calls the module's result_of(params, check_mode) (what main() hands to
exit_json/fail_json: plain JSON types, redacted once by ledger_module.module_result) and removes
every no_log value from it as AnsibleModule does (remove_values). Anything else runs the real
module (_execute_module; ActionBase.cleanup() removes its temporary directory).

Only public interfaces of ansible-core are used: ArgumentSpecValidator and its result's
validated_parameters/errors, remove_values, and the ActionBase API of an action plugin.

Each task runs in its own forked worker process (also with forks=25), and every module opens and
closes its own connections and stops its threads before returning: nothing is shared between
tasks or hosts. What is shared is code: the strategy loads each action class in the
controller's main process before it forks the task's worker, and loading the class imports the
stage module (LedgerAction.__init_subclass__). Every later worker inherits it compiled, with
its module_utils and psycopg2; imported in the worker instead, they were compiled again for
each stage, since the collection loader compiles from source and keeps no bytecode cache.
"""

from __future__ import annotations

import importlib
import os
import sys

from ansible import constants as C
from ansible import context
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.common.parameters import remove_values
from ansible.module_utils.errors import UnsupportedError
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.utils.vars import merge_hash
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import run_options_from_cli

display = Display()

PLUGINS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES_DIR = os.path.join(PLUGINS, "modules")
LOCAL_TRANSPORTS = ("local", "ansible.builtin.local", "ansible.legacy.local")


def load_module(name):
    """The module plugins/modules/<name>.py of this collection, imported in this process."""
    return importlib.import_module("ansible_collections.arrakis.ledger.plugins.modules." + name)


def preload_module(name):
    """Import the stage module now, if it can be: a module that cannot be imported on the
    controller (a dependency missing) is imported again, and reported, when a task needs it."""
    try:
        load_module(name)
    except Exception as exc:  # noqa: BLE001 - never fail an action plugin's import for it
        display.vvvv("%s: not preloaded (%s)" % (name, type(exc).__name__))


def _venv_of(path):
    """The virtualenv an interpreter at `path` runs in (pyvenv.cfg beside or above it), else None."""
    here = os.path.dirname(os.path.abspath(path))
    for directory in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(directory, "pyvenv.cfg")):
            return os.path.realpath(directory)
    return None


def same_python(interpreter):
    """Whether `interpreter` is this very Python: same binary (realpaths) and same virtualenv.

    A venv's bin/python resolves to the base interpreter, so the realpaths alone would also match
    /usr/bin/python3, which has none of the venv's packages.
    """
    if os.path.realpath(interpreter) != os.path.realpath(sys.executable):
        return False
    return _venv_of(interpreter) == _venv_of(sys.executable)


def validate(mod, name, args):
    """(params, no_log_values, error message or None): AnsibleModule's validation, without AnsibleModule."""
    validator = ArgumentSpecValidator(mod.ARGUMENT_SPEC, **getattr(mod, "SPEC_OPTIONS", {}))
    outcome = validator.validate(args)
    no_log_values = no_log_values_of(mod.ARGUMENT_SPEC, outcome.validated_parameters)
    try:
        error = outcome.errors[0]
    except IndexError:
        error = None
    if error:
        msg = outcome.errors.msg
        if isinstance(error, UnsupportedError):
            msg = "Unsupported parameters for ({name}) {kind}: {msg}".format(name=name, kind="module", msg=msg)
        return outcome.validated_parameters, no_log_values, msg
    return outcome.validated_parameters, no_log_values, None


def no_log_values_of(argument_spec, params):
    """The values of the no_log options (what AnsibleModule masks), from the spec and the validated params."""
    values = set()
    for name, spec in argument_spec.items():
        value = params.get(name)
        if spec.get("no_log") and value not in (None, ""):
            values.update(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values


def finish(result, params, no_log_values):
    """What AnsibleModule.exit_json/fail_json return: the invocation added, every no_log value masked."""
    result = dict(result)
    result.setdefault("invocation", {"module_args": params})
    preserved = dict((k, v) for k, v in result.items() if v is None or isinstance(v, bool))
    result = remove_values(result, no_log_values)
    result.update(preserved)
    return result


def call(name, args, check_mode, resolved_name=None):
    """Run module `name` in this process: the result dict _execute_module would have returned.

    resolved_name is the task's module as Ansible resolved it (arrakis.ledger.<name>), which
    AnsibleModule names in its argument errors.
    """
    mod = load_module(name)
    params, no_log_values, error = validate(mod, resolved_name or name, args)
    if error:
        result = {"failed": True, "msg": error}
    else:
        try:
            result = mod.result_of(params, check_mode=check_mode)
        except Exception as exc:  # noqa: BLE001 - result_of never raises; this is the last guard
            result = {"failed": True,
                      "msg": "%s failed unexpectedly: %s (a bug: please report it with this message)"
                             % (name, type(exc).__name__)}
    return finish(result, params, no_log_values)


class LedgerAction(ActionBase):
    """Base of plugins/action/ledger_<stage>.py; MODULE is the module's name."""

    MODULE = None
    _supports_check_mode = True
    _supports_async = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.MODULE:
            preload_module(cls.MODULE)

    def _in_process(self, task_vars):
        """Why the module must run the usual way, or None when it may run in this process."""
        if self._connection.transport not in LOCAL_TRANSPORTS:
            return "connection %s" % self._connection.transport
        if self._play_context.become:
            return "become"
        if self._task.delegate_to:
            return "delegate_to"
        if any(self._task.environment or []):
            return "a task environment"
        if not os.path.isfile(os.path.join(MODULES_DIR, self.MODULE + ".py")):
            return "no module file"
        try:
            interpreter = self._templar.template(task_vars.get("ansible_python_interpreter"))
        except Exception as exc:  # noqa: BLE001 - anything unclear: run the module the usual way
            return "interpreter not resolved: %s" % type(exc).__name__
        if not isinstance(interpreter, str) or not os.path.isabs(interpreter):
            return "interpreter %r" % (interpreter,)
        if not same_python(interpreter):
            return "interpreter %s is not %s" % (interpreter, sys.executable)
        return None

    def around(self, args, task_vars, execute):
        """Run execute(args) -> result; ledger_backup overrides it to report progress meanwhile."""
        return execute(args)

    def run(self, tmp=None, task_vars=None):
        result = super(LedgerAction, self).run(tmp, task_vars)
        del tmp
        task_vars = task_vars or {}
        args = dict(self._task.args)
        if "run_options" not in args and "run_options" in getattr(load_module(self.MODULE), "ARGUMENT_SPEC", {}):
            # The next commands of the module carry this run's -i, -l, -e (ledger_next, the one rule).
            args["run_options"] = run_options_from_cli(context.CLIARGS, C.DEFAULT_HOST_LIST)
        if self._task.async_val:
            wrap_async = not self._connection.has_native_async
            return merge_hash(result, self._execute_module(module_args=args, task_vars=task_vars,
                                                           wrap_async=wrap_async))
        why_not = self._in_process(task_vars)
        if why_not:
            display.vvv("%s: running the module (%s)" % (self.MODULE, why_not))
            return merge_hash(result, self.around(
                args, task_vars, lambda a: self._execute_module(module_args=a, task_vars=task_vars)))
        display.vvv("%s: running the module in-process (local connection, controller's Python)" % self.MODULE)
        check_mode = bool(self._task.check_mode)
        return merge_hash(result, self.around(args, task_vars, lambda a: call(
            self.MODULE, a, check_mode, self._task.resolved_action)))
