# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The operator's screen: one line per stage and target, a failure once, details only with -v.

The default callback shows every task banner, every result as a dump and a failure as often as
it is re-raised (the module's [ERROR], the rescue's fail task, ...). At verbosity 0 this one
prints what an operator needs at 3 a.m. and nothing else; from -v on it is the default callback.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: ledger_screen
type: stdout
short_description: One line per stage and target, each failure once as one block
description:
  - At default verbosity, a successful stage prints one line per target saying what it did
    (precheck checks, the backup file with its size, sha256 prefix and how it was verified,
    the migrations applied or rehearsed and what was not rehearsed, the verify checks and what
    was not verified); a debug message (status, plans) is printed as its text.
  - A failure prints one block once per target - what failed, the target, file and line,
    SQLSTATE and message, the statement, the state the database is left in and the next
    command - however many tasks re-raise it. No task banners, no result dumps, no
    argument-validation lines.
  - With C(-v) or more, every line of the default callback is back.
extends_documentation_fragment:
  - default_callback
  - result_format_callback
requirements:
  - set as the stdout callback in ansible.cfg (C(stdout_callback = arrakis.ledger.ledger_screen))
"""

from ansible.plugins.callback.default import CallbackModule as DefaultCallback

from ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_screen_lines import (
    failure_text,
    new_part,
    stage_line,
)

# Results of these actions are stage results; their line replaces the result dump.
STAGE_ACTIONS = ("ledger_precheck", "ledger_backup", "ledger_migrate", "ledger_verify", "ledger_rollback",
                 "ledger_promotion")
DEBUG_ACTIONS = ("debug",)


def _short(name):
    return (name or "").rsplit(".", 1)[-1]


class CallbackModule(DefaultCallback):
    """The default callback from -v on; the operator's screen at verbosity 0."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "arrakis.ledger.ledger_screen"

    def __init__(self, *args, **kwargs):
        super(CallbackModule, self).__init__(*args, **kwargs)
        self._shown = {}  # host -> failure texts already printed for it

    def _quiet(self):
        return self._display.verbosity < 1

    # Banners: none at verbosity 0 (a task's name says nothing a stage line does not).
    def v2_playbook_on_play_start(self, play):
        if not self._quiet():
            super(CallbackModule, self).v2_playbook_on_play_start(play)

    def v2_playbook_on_task_start(self, task, is_conditional):
        if not self._quiet():
            super(CallbackModule, self).v2_playbook_on_task_start(task, is_conditional)

    def v2_playbook_on_handler_task_start(self, task):
        if not self._quiet():
            super(CallbackModule, self).v2_playbook_on_handler_task_start(task)

    def v2_playbook_on_include(self, included_file):
        if not self._quiet():
            super(CallbackModule, self).v2_playbook_on_include(included_file)

    def v2_playbook_on_no_hosts_remaining(self):
        if not self._quiet():
            super(CallbackModule, self).v2_playbook_on_no_hosts_remaining()

    def v2_runner_retry(self, result):
        if not self._quiet():
            super(CallbackModule, self).v2_runner_retry(result)

    def v2_runner_on_start(self, host, task):
        if not self._quiet():
            super(CallbackModule, self).v2_runner_on_start(host, task)

    def v2_runner_item_on_ok(self, result):
        if not self._quiet():
            super(CallbackModule, self).v2_runner_item_on_ok(result)

    def v2_runner_item_on_skipped(self, result):
        if not self._quiet():
            super(CallbackModule, self).v2_runner_item_on_skipped(result)

    def v2_runner_item_on_failed(self, result):
        if not self._quiet():
            super(CallbackModule, self).v2_runner_item_on_failed(result)

    def v2_runner_on_skipped(self, result):
        if not self._quiet():
            return super(CallbackModule, self).v2_runner_on_skipped(result)
        # The backup role's one skipped task is the whole stage when nothing is pending.
        task = result._task
        role = getattr(task, "_role", None)
        if role is not None and _short(role.get_name()) == "backup" and _short(task.action) == "include_tasks":
            self._display.display(self._prefix(result._host.get_name(), "backup: not needed (nothing pending)"))
        return None

    def v2_runner_on_ok(self, result):
        if not self._quiet():
            return super(CallbackModule, self).v2_runner_on_ok(result)
        action = _short(result._task.action)
        res = result._result
        host = result._host.get_name()
        text = None
        if action in STAGE_ACTIONS:
            text = stage_line(action, res, bool(result._task.check_mode))
        elif action in DEBUG_ACTIONS and "msg" in res and not res.get("skipped_reason"):
            msg = res["msg"]
            text = msg if isinstance(msg, str) else "\n".join(str(m) for m in msg) if isinstance(msg, list) \
                else self._dump_results({"msg": msg})
        if text:
            self._display.display(self._prefix(host, text))

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if not self._quiet():
            return super(CallbackModule, self).v2_runner_on_failed(result, ignore_errors)
        if ignore_errors:
            return None
        host = result._host.get_name()
        text = failure_text(result._result, result._task.get_name())
        self._show_failure(host, text)
        return None

    def v2_runner_on_unreachable(self, result):
        if not self._quiet():
            return super(CallbackModule, self).v2_runner_on_unreachable(result)
        self._show_failure(result._host.get_name(), failure_text(result._result, result._task.get_name()))
        return None

    def _show_failure(self, host, text):
        """Print the part of a failure this host has not shown yet (a rescue re-raises the same message)."""
        shown = self._shown.setdefault(host, [])
        rest = new_part(text, shown)
        shown.append(text)
        if rest:
            self._display.display("FAILED " + self._prefix(host, rest), color="red", stderr=False)

    @staticmethod
    def _prefix(host, text):
        lines = text.rstrip("\n").split("\n")
        return "\n".join(["%s: %s" % (host, lines[0])] + ["  " + line for line in lines[1:]])
