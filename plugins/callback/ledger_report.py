# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Write a JSON and a Markdown report of every ledger pipeline run.

Enabled in ansible.cfg (``callbacks_enabled = ledger_report``). It only
observes: it never changes a task's result, and a failure to write the report
is a warning, never a failed run.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: ledger_report
type: aggregate
short_description: Write <report_dir>/<run_id>.json and .md for every ledger pipeline run
description:
  - At the end of every run of a playbook of this project (including a run stopped
    by max_fail_percentage and a --check run), writes C(<report_dir>/<run_id>.json)
    and a Markdown summary beside it.
  - Per target it records each stage (precheck, backup, migrate, verify, rollback,
    promotion) with its duration and outcome, the migrations applied, the backup
    file and its sha256, the verify checks, what point-in-time recoveries left
    beside the data directory, and the failure with its SQLSTATE, file and line;
    and which targets are done, failed, interrupted or untouched.
  - A stage is recognised by the module (ledger_precheck, ledger_backup,
    ledger_migrate, ledger_verify, ledger_rollback, ledger_promotion) or by the role
    the task belongs to.
  - The run id is the C(ledger_run_id) fact set by playbooks/tasks/require_limit.yml.
    A run that never set it and reached no stage (a refused run, Molecule's
    create/destroy) writes no report.
  - C(report_dir) is read like any variable (C(-e report_dir=...) first, then play,
    inventory and group vars), else the environment variable C(LEDGER_REPORT_DIR)
    (for test suites), else C(reports/) beside ansible.cfg. The directory is created
    with mode 0700, the files with mode 0600.
  - Passwords are redacted everywhere (URLs, C(password=) pairs, and every password
    found in the targets' C(*_url) variables and C(DATABASE_URL)).
requirements:
  - enable in ansible.cfg with C(callbacks_enabled = ledger_report)
"""

import datetime
import json
import os
import time

from ansible import constants as C
from ansible import context
from ansible.plugins.callback import CallbackBase

from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_common
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_target import secrets_of
from ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_report_markdown import render_markdown

STAGES = ("precheck", "backup", "migrate", "verify", "rollback", "promotion")
# Keys of our modules' results worth keeping in a report (everything else is noise).
KEEP_KEYS = (
    "msg", "changed", "target", "run_id", "environment", "sqlstate", "file", "line", "version", "position",
    "hint", "detail", "next_command", "applied", "above_target", "skipped", "would_apply", "pending", "rehearsal",
    "rehearsed", "from_version", "to_version", "schema_version", "current_version", "target_version",
    "backup_file", "backup", "path", "manifest", "manifest_file", "sha256", "size", "size_bytes", "format",
    "verified", "verification", "checks", "failed_checks", "passed", "reverted", "restored", "mode",
    "stamp", "stamp_file", "set_checksum", "override", "refused", "taken", "duration_ms", "elapsed", "impact",
    "method", "restore_point", "lsn", "timeline", "backup_label", "pitr_leftovers",  # backup_method=pgbackrest
)
# Keys that more than one task of a stage return: their lists add up instead of replacing each other.
LIST_KEYS = ("checks", "failed_checks")
FAILURE_KEYS = ("msg", "sqlstate", "file", "line", "version", "hint", "detail", "next_command", "failed_checks")


def _now():
    return time.time()


def _iso(ts):
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _short(name):
    """`ledger_migrate` from `ansible.legacy.ledger_migrate` or `ns.coll.ledger_migrate`."""
    return (name or "").rsplit(".", 1)[-1]


def task_stage(task):
    """The pipeline stage a task belongs to, or None."""
    action = _short(getattr(task, "action", None))
    if action.startswith("ledger_") and action[len("ledger_"):] in STAGES:
        return action[len("ledger_"):]
    role = getattr(task, "_role", None)
    while role is not None:
        try:
            name = _short(role.get_name())
        except Exception:  # noqa: BLE001 - a callback must never break a run
            name = None
        if name in STAGES:
            return name
        # A role included by another role: look at its parents.
        parents = getattr(role, "_parents", None) or []
        role = parents[0] if parents else None
    return None


class CallbackModule(CallbackBase):
    """Collect per-target stage results and write the run's reports at the end."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "ledger_report"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super(CallbackModule, self).__init__(*args, **kwargs)
        self.started = _now()
        self.playbook = None
        self.run_id = None
        self.plays = []           # [{"name", "serial", "batches": [[host, ...], ...]}]
        self.targets = {}         # host -> record
        self.expected = []        # hosts in inventory+limit of the plays, in order
        self.aborted = False
        self.secrets = set()
        self._play = None
        self._task_starts = {}    # (host, task uuid) -> start time

    # ------------------------------------------------------------------ events

    def v2_playbook_on_start(self, playbook):
        self.playbook = getattr(playbook, "_file_name", None)

    def v2_playbook_on_play_start(self, play):
        """Called once per play and once per serial batch of a play."""
        self._play = play
        name = play.get_name()
        serial = list(getattr(play, "serial", None) or [])
        inventory = self._inventory(play)
        batch, everyone = [], []
        if inventory is not None:
            try:
                batch = [h.name for h in inventory.get_hosts(play.hosts)]
                everyone = [h.name for h in inventory.get_hosts(play.hosts, ignore_restrictions=True)]
            except Exception:  # noqa: BLE001
                pass
        for host in everyone:
            if host not in self.expected:
                self.expected.append(host)
        if self.plays and self.plays[-1]["uuid"] == play._uuid:
            self.plays[-1]["batches"].append(batch)
        else:
            self.plays.append({"uuid": play._uuid, "name": name, "serial": [str(s) for s in serial],
                               "batches": [batch], "play": play})

    def v2_playbook_on_no_hosts_remaining(self):
        self.aborted = True

    def v2_runner_on_start(self, host, task):
        self._task_starts[(host.name, task._uuid)] = _now()
        # A target is reached when one of its stages starts; the run's bookkeeping
        # (require_limit.yml, require_tls.yml) does not count.
        if task_stage(task) is not None:
            self._reached(host.name, _now())

    def _reached(self, host, when):
        rec = self._target(host)
        if rec["first_seen"] is None:
            rec["first_seen"] = when
            rec["batch"] = len(self.plays[-1]["batches"]) if self.plays and self.plays[-1]["serial"] else None
            rec["play"] = self.plays[-1]["name"] if self.plays else None
        return rec

    def v2_runner_on_ok(self, result):
        self._record(result, "changed" if result.result.get("changed") else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        try:
            self._finish(stats)
        except Exception as exc:  # noqa: BLE001 - never fail a run because of its report
            self._display.warning("ledger_report: could not write the run report: %s" % self._clean(str(exc)))

    # ------------------------------------------------------------------ collection

    def _inventory(self, play):
        try:
            return play.get_variable_manager()._inventory
        except Exception:  # noqa: BLE001
            return None

    def _target(self, host):
        if host not in self.targets:
            self.targets[host] = {"host": host, "target": None, "environment": None, "batch": None, "play": None,
                                  "first_seen": None, "stages": {}, "failures": [], "unreachable": False}
        return self.targets[host]

    def _record(self, result, outcome):
        """One task result of one host: into its stage, its failures, or the run's bookkeeping."""
        host = result.host.name
        task = result.task
        data = result.result or {}
        facts = data.get("ansible_facts") or {}
        if facts.get("ledger_run_id") and not self.run_id:
            self.run_id = str(facts["ledger_run_id"])
        if data.get("run_id") and not self.run_id and isinstance(data.get("run_id"), str):
            self.run_id = data["run_id"]
        stage = task_stage(task)
        end = _now()
        start = self._task_starts.pop((host, task._uuid), end)
        if stage is None and outcome not in ("failed", "unreachable"):
            return  # bookkeeping (require_limit.yml, a role's summary message): not part of a stage
        rec = self._reached(host, start)
        if data.get("target") and isinstance(data.get("target"), str):
            rec["target"] = data["target"]
        if outcome == "unreachable":
            rec["unreachable"] = True
        if stage is not None:
            st = rec["stages"].setdefault(stage, {"outcome": None, "started": start, "ended": end, "tasks": [],
                                                  "details": {}})
            st["ended"] = end
            st["tasks"].append({"task": result.task_name, "outcome": outcome,
                                "duration_s": round(end - start, 3)})
            # A role's argument validation is part of the stage's time, not of its outcome,
            # unless it failed: a stage whose work was all skipped is "skipped".
            if _short(getattr(task, "action", None)) != "validate_argument_spec" or outcome == "failed":
                st["outcome"] = self._merge_outcome(st["outcome"], outcome)
            elif st["outcome"] is None:
                st["outcome"] = "skipped"
            if not data.get("censored"):
                for key in KEEP_KEYS:
                    if key in data and key not in ("changed",) and data[key] not in (None, "", [], {}):
                        if key == "msg" and outcome not in ("failed", "unreachable"):
                            continue
                        before = st["details"].get(key)
                        if key in LIST_KEYS and isinstance(before, list) and isinstance(data[key], list):
                            # Two tasks of one stage (the precheck's checklist, then its pgBackRest
                            # checks): the stage holds both lists, not only the last.
                            st["details"][key] = before + data[key]
                        else:
                            st["details"][key] = data[key]
        if outcome in ("failed", "unreachable"):
            failure = {"stage": stage, "task": result.task_name, "at": _iso(end)}
            if data.get("censored"):
                failure["msg"] = "the task's output is hidden by no_log; see the task %r" % result.task_name
            for key in FAILURE_KEYS:
                if data.get(key) not in (None, "", [], {}):
                    failure[key] = data[key]
            rec["failures"].append(failure)

    @staticmethod
    def _merge_outcome(old, new):
        order = ["skipped", "ok", "changed", "ignored", "failed", "unreachable"]
        if old is None:
            return new
        return old if order.index(old) >= order.index(new) else new

    # ------------------------------------------------------------------ variables

    def _host_vars(self, play, host_name, names):
        """Templated values of some variables for one host; missing or failing ones are left out."""
        out = {}
        try:
            from ansible.template import Templar
            vm = play.get_variable_manager()
            host = vm._inventory.get_host(host_name)
            all_vars = vm.get_vars(play=play, host=host, include_hostvars=False)
            templar = Templar(loader=play.get_loader(), variables=all_vars)
        except Exception:  # noqa: BLE001
            return out
        wanted = list(names)
        if "*_url" in wanted:
            wanted.remove("*_url")
            try:
                wanted += [k for k in all_vars.keys() if str(k).endswith("_url")]
            except Exception:  # noqa: BLE001
                pass
        for name in wanted:
            try:
                if name in all_vars:
                    value = templar.template(all_vars[name])
                    if value is not None:
                        out[name] = value
            except Exception:  # noqa: BLE001 - an undefined or vaulted value we can't see
                continue
        return out

    def _collect(self, play):
        """Find every password the report must not contain, the targets' names and report_dir."""
        env_url = os.environ.get("DATABASE_URL")
        self._add_secrets(env_url)
        report_dir = None
        hosts = list(self.expected) or list(self.targets)
        for host in hosts:
            values = self._host_vars(play, host, ["*_url", "database_url", "ledger_environment", "report_dir"])
            for key, value in values.items():
                if key.endswith("_url") and isinstance(value, str):
                    self._add_secrets(value)
            rec = self.targets.get(host)
            if rec is not None:
                if not rec["target"] and isinstance(values.get("database_url"), str):
                    rec["target"] = ledger_common.describe_target(values["database_url"])
                if values.get("ledger_environment"):
                    rec["environment"] = str(values["ledger_environment"])
            if report_dir is None and values.get("report_dir"):
                report_dir = str(values["report_dir"])
        if report_dir is None and play is not None:
            try:
                report_dir = play.get_variable_manager().extra_vars.get("report_dir")
            except Exception:  # noqa: BLE001
                report_dir = None
        return report_dir or os.environ.get("LEDGER_REPORT_DIR") or None

    def _add_secrets(self, url):
        """The password of a database URL, in every form text may hold it (ledger_target.secrets_of)."""
        self.secrets.update(s for s in secrets_of(url) if len(s) >= 3)

    def _clean(self, obj):
        """Redact URLs and password pairs, then every known password verbatim."""
        obj = ledger_common.redact_obj(obj)
        if not self.secrets:
            return obj
        secrets = sorted(self.secrets, key=len, reverse=True)

        def scrub(value):
            if isinstance(value, dict):
                return dict((scrub(k), scrub(v)) for k, v in value.items())
            if isinstance(value, (list, tuple)):
                return [scrub(v) for v in value]
            if isinstance(value, str):
                for secret in secrets:
                    value = value.replace(secret, "********")
            return value
        return scrub(obj)

    # ------------------------------------------------------------------ report

    def _finish(self, stats):
        ended = _now()
        play = self.plays[-1]["play"] if self.plays else None
        touched_stage = any(rec["stages"] for rec in self.targets.values())
        if not self.run_id and not touched_stage:
            return  # not a pipeline run (or refused before it started): nothing to report
        report_dir = self._collect(play)
        if not self.run_id:
            self.run_id = ledger_common.new_run_id()
        report = self._build(stats, ended)
        report = self._clean(report)
        directory = self._report_dir(report_dir)
        base = os.path.join(directory, self._safe_name(self.run_id))
        self._write(base + ".json", json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
        self._write(base + ".md", self._clean(render_markdown(report)))
        s = report["summary"]
        self._display.display("Run report: %s.md (done %d, failed %d, interrupted %d, untouched %d)" % (
            base, len(s["done"]), len(s["failed"]), len(s["interrupted"]), len(s["untouched"])))

    @staticmethod
    def _safe_name(run_id):
        return "".join(c if c.isalnum() or c in "-_.T" else "_" for c in run_id)[:120]

    def _build(self, stats, ended):
        check = bool(context.CLIARGS.get("check", False))
        # The final truth of a host's failure is Ansible's: a failure rescued by a block that
        # then went on (not ours: our rescue re-fails) does not fail the target.
        failures = set(h for h, n in getattr(stats, "failures", {}).items() if n)
        failures |= set(h for h, n in getattr(stats, "dark", {}).items() if n)
        targets = {}
        done, failed, interrupted, untouched = [], [], [], []
        order = list(self.expected) + [h for h in self.targets if h not in self.expected]
        for host in order:
            rec = self.targets.get(host)
            if rec is None or rec["first_seen"] is None:
                untouched.append(host)
                continue
            if host in failures or rec["unreachable"]:
                outcome = "failed"
            elif self.aborted and rec["stages"].get("verify", {}).get("outcome") not in ("ok", "changed"):
                # Its batch was stopped by another target's failure before its pipeline ended.
                outcome = "interrupted"
            else:
                outcome = "done"
            {"done": done, "failed": failed, "interrupted": interrupted}[outcome].append(host)
            targets[host] = self._target_report(rec, outcome)
        for host in untouched:
            targets[host] = {"host": host, "outcome": "untouched", "stages": {}}
        targets = dict((host, targets[host]) for host in order)  # inventory order
        serial_play = next((p for p in self.plays if p["serial"]), None)
        if failed:
            status = "failed"
        elif interrupted or (untouched and self.aborted):
            status = "stopped"
        else:
            status = "succeeded"
        return {
            "run_id": self.run_id,
            "playbook": self.playbook,
            "check_mode": check,
            "limit": context.CLIARGS.get("subset"),
            "status": status,
            "started_at": _iso(self.started),
            "ended_at": _iso(ended),
            "duration_s": round(ended - self.started, 3),
            "summary": {"done": done, "failed": failed, "interrupted": interrupted, "untouched": untouched},
            "batches": [list(b) for b in (serial_play or {"batches": []})["batches"]],
            "plays": [{"name": p["name"], "serial": p["serial"], "batches": [list(b) for b in p["batches"]]}
                      for p in self.plays],
            "targets": targets,
        }

    def _target_report(self, rec, outcome):
        stages = {}
        for name in sorted(rec["stages"], key=lambda n: rec["stages"][n]["started"]):
            st = rec["stages"][name]
            stages[name] = {
                "outcome": st["outcome"],
                "started_at": _iso(st["started"]),
                "ended_at": _iso(st["ended"]),
                "duration_s": round(st["ended"] - st["started"], 3),
                "tasks": st["tasks"],
                "details": st["details"],
            }
        out = {
            "host": rec["host"],
            "target": rec["target"],
            "environment": rec["environment"],
            "batch": rec["batch"],
            "outcome": outcome,
            "stages": stages,
            "migrations_applied": self._applied(stages),
            "migrations_pending": self._pending(stages),
            "backup": self._backup(stages),
            "verify": self._verify(stages),
            "impact": self._impact(stages),
            # What point-in-time recoveries left beside the data directory (the pgBackRest precheck's list).
            "pitr_leftovers": stages.get("precheck", {}).get("details", {}).get("pitr_leftovers") or [],
            "failure": self._failure(rec),
        }
        return out

    @staticmethod
    def _impact(stages):
        """The impact profile: the migrate stage's (--check), else the precheck's rehearsal (or staging's)."""
        for name in ("migrate", "precheck"):
            impact = stages.get(name, {}).get("details", {}).get("impact")
            if isinstance(impact, dict):
                return impact
        return None

    @staticmethod
    def _applied(stages):
        details = stages.get("migrate", {}).get("details", {})
        applied = details.get("applied") or []
        out = []
        for item in applied if isinstance(applied, list) else [applied]:
            if isinstance(item, dict):
                out.append(item.get("version") or item.get("file") or item.get("name") or item)
            else:
                out.append(item)
        return out

    @staticmethod
    def _pending(stages):
        """What was pending when the run started (what a --check run would apply)."""
        for name in ("migrate", "precheck"):
            pending = stages.get(name, {}).get("details", {}).get("pending")
            if isinstance(pending, list):
                return [p.get("version", p) if isinstance(p, dict) else p for p in pending]
        return []

    @staticmethod
    def _backup(stages):
        if "backup" not in stages:
            return None
        details = stages["backup"]["details"]
        nested = details.get("backup") if isinstance(details.get("backup"), dict) else {}
        manifest = details.get("manifest") if isinstance(details.get("manifest"), dict) else {}
        file_ = (details.get("backup_file") or nested.get("file") or nested.get("path") or details.get("path")
                 or manifest.get("file") or (details.get("backup") if isinstance(details.get("backup"), str) else None))
        sha = details.get("sha256") or nested.get("sha256") or manifest.get("sha256")
        if not file_ and not sha:
            return {"taken": False, "outcome": stages["backup"]["outcome"]}
        manifest_file = details.get("manifest_file") or (
            details.get("manifest") if isinstance(details.get("manifest"), str) else None)
        return {"taken": True, "file": file_, "sha256": sha, "manifest": manifest_file,
                "verified": details.get("verified", nested.get("verified", manifest.get("verified"))),
                "restore_point": details.get("restore_point"), "lsn": details.get("lsn"),
                "backup_label": details.get("backup_label")}

    @staticmethod
    def _verify(stages):
        st = stages.get("verify")
        if not st:
            return None
        checks = st["details"].get("checks") or []
        if isinstance(checks, dict):
            checks = [dict({"name": k}, **(v if isinstance(v, dict) else {"passed": v})) for k, v in checks.items()]
        normalised = []
        for check in checks if isinstance(checks, list) else []:
            if not isinstance(check, dict):
                continue
            check = dict(check)
            if not isinstance(check.get("passed"), bool):
                status = str(check.get("status", "")).lower()
                check["passed"] = True if status in ("passed", "ok") else False if status in (
                    "failed", "error") else None
            normalised.append(check)
        return {"outcome": st["outcome"], "passed": sum(1 for c in normalised if c["passed"] is True),
                "failed": sum(1 for c in normalised if c["passed"] is False), "checks": normalised,
                "failed_checks": st["details"].get("failed_checks")}

    @staticmethod
    def _failure(rec):
        if not rec["failures"]:
            return None
        # The first failure of a stage is the cause; later ones (a rescue's fail) restate it.
        staged = [f for f in rec["failures"] if f["stage"] is not None]
        first = dict((staged or rec["failures"])[0])
        last = rec["failures"][-1]
        if last is not (staged or rec["failures"])[0] and last.get("msg") and last.get("msg") != first.get("msg"):
            first["final_msg"] = last["msg"]
        return first

    def _report_dir(self, configured):
        root = os.path.dirname(C.CONFIG_FILE) if getattr(C, "CONFIG_FILE", None) else os.getcwd()
        if configured:
            directory = os.path.abspath(os.path.expanduser(configured))
        else:
            directory = os.path.join(root, "reports")
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        elif not configured:
            os.chmod(directory, 0o700)
        elif os.stat(directory).st_mode & 0o077:
            self._display.warning("ledger_report: %s is readable by other users; reports are 0600 but the "
                                  "directory should be 0700" % directory)
        return directory

    @staticmethod
    def _write(path, text):
        tmp = "%s.%d.tmp" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except Exception:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
