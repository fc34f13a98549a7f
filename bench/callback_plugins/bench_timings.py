# -*- coding: utf-8 -*-
"""Write per-host, per-task timings of a playbook run as JSON, for make bench.

Enabled only by bench/run.py (ANSIBLE_CALLBACK_PLUGINS=bench/callback_plugins,
ANSIBLE_CALLBACKS_ENABLED=bench_timings, BENCH_TIMINGS_FILE=<path>); it never changes
what the playbook prints or does.
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: bench_timings
type: aggregate
short_description: per-host task timings as JSON for make bench
description:
  - Records the start, end and status of every task on every host and writes them to the
    file named by the environment variable BENCH_TIMINGS_FILE when the playbook ends.
options: {}
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_timings"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._t0 = time.time()
        self._open = {}
        self._tasks = []
        self._plays = []

    def v2_playbook_on_play_start(self, play):
        self._plays.append({"name": play.get_name(), "start": time.time() - self._t0})

    def v2_runner_on_start(self, host, task):
        self._open[(host.get_name(), task._uuid)] = time.time()

    def _done(self, result, status):
        end = time.time()
        host = result._host.get_name()
        task = result._task
        start = self._open.pop((host, task._uuid), end)
        role = task._role.get_name() if getattr(task, "_role", None) else None
        if status == "ok" and result._result.get("changed"):
            status = "changed"
        self._tasks.append({
            "host": host,
            "task": task.get_name(),
            "role": role,
            "action": task.action,
            "status": status,
            "start": round(start - self._t0, 4),
            "end": round(end - self._t0, 4),
            "seconds": round(end - start, 4),
        })

    def v2_runner_on_ok(self, result):
        self._done(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._done(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._done(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._done(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("BENCH_TIMINGS_FILE")
        if not path:
            return
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"started": self._t0, "seconds": round(time.time() - self._t0, 4),
                       "plays": self._plays, "tasks": self._tasks}, fh, indent=1)
