#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Arrakis platform team
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Record (staging) or check (production) the promotion stamp of a migration set."""

from __future__ import annotations

DOCUMENTATION = r"""
module: ledger_promotion
short_description: Staging before production - record or check a migration set's promotion stamp
description:
  - "The set checksum is the sha256 of the lines C(<sha256 of file>  <file name>) of the
    set's up migrations up to a version, sorted by file name. In files/migrations,
    C(ls [0-9][0-9][0-9][0-9]_*.sql | grep -v '\\.down\\.sql$' | xargs sha256sum | LC_ALL=C sort -k2 | sha256sum)
    prints it."
  - C(state=record) runs after verify passed on a staging target. It reads the target's
    C(migrations.history), refuses if the applied checksums differ from the local files,
    refuses unless the target's C(migrations.events) holds a C(verify) event of this run
    (O(run_id)) whose outcome is C(passed) (a skipped verify, or one that recorded no event,
    stamps nothing), then adds this target's stamp to C(<stamp_dir>/<set checksum>.json) and
    appends a C(promotion_stamp) event to the target's C(migrations.events).
  - C(state=check) runs before precheck on a production target. Nothing pending passes.
    Otherwise it passes only with a stamp of the same set from staging with verify passed,
    found in C(<stamp_dir>/<set checksum>.json) or, when C(staging_url) is given, in
    staging's C(migrations.events); or with C(override=true), which is logged as a
    C(promotion_override) event on the target.
  - Check mode writes nothing (no stamp, no event) and says what it would do.
options:
  state:
    description: record (after verify on staging) or check (before precheck on production).
    type: str
    choices: [record, check]
    required: true
  database_url:
    description: libpq URI of this target.
    type: str
    required: true
  migrations_dir:
    description: Directory of the migration set.
    type: path
    required: true
  target:
    description: Highest version of the set (check); empty for the newest file.
    type: str
    default: ""
  stamp_dir:
    description: Where the stamp files are (the repository's promotions/).
    type: path
    required: true
  environment:
    description: This target's environment (recorded in the stamp).
    type: str
    default: staging
  accept_from:
    description: Environments whose stamps production accepts.
    type: list
    elements: str
    default: [staging]
  host:
    description: This target's inventory name (recorded in the stamp).
    type: str
    default: ""
  run_id:
    description: The run id (ledger_run_id).
    type: str
    required: true
  run_options:
    description: The ansible-playbook options (-i -l -e vault) every next command carries; set by the action plugin.
    type: list
    elements: str
  staging_url:
    description: libpq URI of a staging database whose events are also searched for a stamp (check).
    type: str
    default: ""
  override:
    description: Accept a set without a stamp (check); logged as a promotion_override event.
    type: bool
    default: false
  impact_profile:
    description:
      - record - the impact profile of the run's precheck rehearsal (per file and statement, module_utils/ledger_impact.py),
        kept in the stamp entry and the C(promotion_stamp) event; check returns it as RV(impact_profile).
    type: list
    elements: dict
    default: []
author: Arrakis platform team (@arrakis-platform)
"""

EXAMPLES = r"""
- name: Record the stamp of the set staging verified (after verify passed in this run)
  arrakis.ledger.ledger_promotion:
    state: record
    database_url: "{{ database_url }}"
    migrations_dir: "{{ migrations_dir }}"
    stamp_dir: "{{ playbook_dir }}/../promotions"
    run_id: "{{ ledger_run_id }}"
    host: "{{ inventory_hostname }}"

- name: Refuse a production migration whose set has no passing staging stamp
  arrakis.ledger.ledger_promotion:
    state: check
    database_url: "{{ database_url }}"
    migrations_dir: "{{ migrations_dir }}"
    stamp_dir: "{{ playbook_dir }}/../promotions"
    environment: production
    run_id: "{{ ledger_run_id }}"
"""

RETURN = r"""
set_checksum: {description: The set checksum, type: str, returned: always}
version: {description: Highest version of the set, type: str, returned: always}
files: {description: The set's files and their sha256, type: list, returned: always}
stamp: {description: The stamp found (check) or recorded (record), type: dict, returned: when found}
stamp_file: {description: Path of the stamp file, type: str, returned: always}
impact_profile: {description: "check: staging's impact profile from the stamp (empty when none)", type: list, returned: state=check}
source: {description: "check: nothing_pending, file, staging_events or override", type: str, returned: state=check}
override: {description: Whether the override was used, type: bool, returned: state=check}
target: {description: "This target, without its password.", type: str, returned: always}
"""

import datetime
import fcntl
import hashlib
import json
import os
import re
import tempfile

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_module import module_result, run_module
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_migration_set import up_files
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import RUN_OPTIONS_SPEC, playbook_command
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import (
    LedgerError, actor, connect, describe_target, ensure_records, log_event, pg_error, format_pg_error,
    records_exist)

try:
    import psycopg2
except ImportError:  # pragma: no cover - reported by connect()
    psycopg2 = None

ALGORITHM = ("sha256 of the lines '<sha256 of file>  <file name>\\n' of the set's up migrations, sorted by file "
             "name: sha256sum <up files> | LC_ALL=C sort -k2 | sha256sum")
PASSED = ("passed", "ok", "succeeded", "success")


def migration_set(migrations_dir, up_to=None):
    """[(version, file name, sha256)] of the up migrations up to a version, in order (the engine's file-name rule)."""
    out = up_files(migrations_dir, up_to)
    if not out:
        raise LedgerError("no migration files%s in %s" % ((" up to %s" % up_to) if up_to else "", migrations_dir))
    return out


def set_checksum(files):
    """sha256 over the sorted (file name, sha256) list, in sha256sum's line format."""
    text = "".join("%s  %s\n" % (sha, name) for _v, name, sha in sorted(files, key=lambda f: f[1]))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def applied_history(url):
    """{version: checksum} of the target's migrations.history ({} when there are no records)."""
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            if not records_exist(cur):
                return {}
            cur.execute("SELECT version, checksum FROM migrations.history ORDER BY version")
            return dict(cur.fetchall())
    finally:
        conn.close()


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Refusal(LedgerError):
    """A refusal worded in full by Promotion.fail() (run() does not prefix it again)."""


class Promotion(object):
    def __init__(self, params, check_mode):
        self.p = params
        self.check_mode = check_mode
        self.url = self.p["database_url"]
        self.target = describe_target(self.url)

    def fail(self, msg, **fields):
        raise _Refusal(msg, target=self.target, **fields)

    def stamp_path(self, checksum):
        return os.path.join(self.p["stamp_dir"], "%s.json" % checksum)

    @staticmethod
    def files_list(files):
        return [{"version": v, "file": n, "sha256": s} for v, n, s in files]

    # ------------------------------------------------------------------ record

    def record(self):
        history = applied_history(self.url)
        if not history:
            self.fail("promotion: %s has no applied migrations (no migrations.history): nothing to stamp. "
                      "Run `%s` first." % (self.target, playbook_command("migrate", "<staging hosts>", carry=False)))
        version = max(history)
        files = migration_set(self.p["migrations_dir"], version)
        local = dict((v, s) for v, _n, s in files)
        differ = ["%s (applied %s, file %s)" % (v, history.get(v, "missing")[:12], local.get(v, "missing")[:12])
                  for v in sorted(set(history) | set(local)) if history.get(v) != local.get(v)]
        if differ:
            self.fail("promotion: refusing to stamp the set on %s: its applied migrations differ from the files "
                      "in %s: %s. Run `%s` to see the drift."
                      % (self.target, self.p["migrations_dir"], "; ".join(differ),
                         playbook_command("status", self.p["host"] or "<this host>")), version=version)
        checksum = set_checksum(files)
        verify_event = self.verify_event()
        rerun = "`%s`" % playbook_command("migrate", self.p["host"] or "<this host>")
        if verify_event is None and not self.check_mode:
            # A stamp says "verify passed on staging": without a verify event of this run on this
            # target (verify skipped with --skip-tags/--tags, verify_record_event=false, or verify
            # run in another run), nobody proved it, so nothing is stamped.
            self.fail("promotion: no verify event of run %s on %s: the set %s (up to %s) is not stamped, because a "
                      "stamp vouches that verify passed on this target in this run. Verify was skipped "
                      "(--skip-tags/--tags) or ran without recording its event (verify_record_event=false). "
                      "Re-run the whole pipeline with verify: %s (nothing pending is applied again)."
                      % (self.p["run_id"], self.target, checksum[:12], version, rerun),
                      version=version, set_checksum=checksum)
        if verify_event is not None and verify_event["outcome"] != "passed":
            self.fail("promotion: verify of run %s on %s ended '%s': the set %s (up to %s) is not stamped. Fix the "
                      "target (see the verify report), then re-run %s."
                      % (self.p["run_id"], self.target, verify_event["outcome"], checksum[:12], version, rerun),
                      version=version, set_checksum=checksum, verify_event=verify_event)
        entry = {
            "environment": self.p["environment"],
            "host": self.p["host"],
            "target": self.target,
            "verify": "passed" if verify_event else "not yet (check mode)",
            "verify_event": verify_event,
            "recorded_at": now_iso(),
            "run_id": self.p["run_id"],
            "actor": actor(),
        }
        if self.p.get("impact_profile"):
            # Staging's measured impact profile: production's precheck enforces the lock policy from it.
            entry["impact"] = self.p["impact_profile"]
        path = self.stamp_path(checksum)
        result = dict(set_checksum=checksum, version=version, files=self.files_list(files), stamp_file=path,
                      target=self.target)
        if self.check_mode:
            existing = self.read_stamp(path)
            known = existing and any(s.get("target") == self.target for s in existing.get("stamps", []))
            return dict(changed=not known, stamp=entry,
                        msg="would record the promotion stamp %s%s" % (
                            checksum[:12], "" if verify_event else
                            " once verify of the run has passed (check mode records no verify event)"),
                        **result)
        changed, stamp = self.write_stamp(path, checksum, version, files, entry)
        if changed:
            conn = connect(self.url)
            try:
                with conn.cursor() as cur:
                    ensure_records(cur)
                    log_event(cur, self.p["run_id"], "promotion_stamp", "recorded", version=version,
                              detail={"set_checksum": checksum, "files": self.files_list(files),
                                      "environment": self.p["environment"], "stamp_file": os.path.basename(path),
                                      "impact": entry.get("impact") or []})
            finally:
                conn.close()
        return dict(changed=changed, stamp=stamp,
                    msg=("recorded" if changed else "already recorded") + " the promotion stamp %s for %s (%s)"
                    % (checksum, self.target, os.path.basename(path)), **result)

    def verify_event(self):
        """The newest verify event of this run in this target's migrations.events (None when there is none)."""
        conn = connect(self.url)
        try:
            with conn.cursor() as cur:
                if not records_exist(cur):
                    return None
                cur.execute("SELECT id, action, outcome, at::text FROM migrations.events WHERE run_id = %s"
                            " AND action = 'verify' ORDER BY id DESC LIMIT 1", (self.p["run_id"],))
                row = cur.fetchone()
        finally:
            conn.close()
        if not row:
            return None
        return {"id": row[0], "action": row[1], "outcome": str(row[2] or "").lower(), "at": row[3]}

    @staticmethod
    def read_stamp(path):
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def write_stamp(self, path, checksum, version, files, entry):
        """Add this target's entry to the stamp file (under a lock: a staging fleet writes in parallel)."""
        os.makedirs(self.p["stamp_dir"], exist_ok=True)
        # The lock lives outside the repository, so promotions/ holds only stamps.
        lock_path = os.path.join(tempfile.gettempdir(), "ledger-promotion-%s.lock" % hashlib.sha256(
            os.path.realpath(self.p["stamp_dir"]).encode()).hexdigest()[:16])
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            stamp = self.read_stamp(path) or {}
            stamps = [s for s in stamp.get("stamps", []) if isinstance(s, dict)]
            if stamp.get("set_checksum") == checksum and any(s.get("target") == entry["target"] for s in stamps):
                return False, stamp
            stamps.append(entry)
            stamp = {"set_checksum": checksum, "algorithm": ALGORITHM, "version": version,
                     "files": self.files_list(files), "stamps": stamps}
            fd, tmp = tempfile.mkstemp(dir=self.p["stamp_dir"], prefix=".stamp-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o644)  # a record meant to be committed, with no secret in it
            os.replace(tmp, path)
        return True, stamp

    # ------------------------------------------------------------------ check

    def check(self):
        files = migration_set(self.p["migrations_dir"], self.p["target"] or None)
        checksum = set_checksum(files)
        version = files[-1][0]
        path = self.stamp_path(checksum)
        result = dict(set_checksum=checksum, version=version, files=self.files_list(files), stamp_file=path,
                      target=self.target, override=False)
        history = applied_history(self.url)
        if all(history.get(v) == s for v, _n, s in files):
            return dict(changed=False, source="nothing_pending",
                        msg="the set %s (up to %s) is already applied on %s: nothing to promote"
                        % (checksum[:12], version, self.target), **result)
        stamp = self.read_stamp(path)
        found = self.valid_stamp(stamp, checksum)
        if found:
            return dict(changed=False, source="file", stamp=found, impact_profile=found.get("impact") or [],
                        msg="the set %s (up to %s) passed verify on %s %s in run %s (%s)"
                        % (checksum[:12], version, found.get("environment"), found.get("target"),
                           found.get("run_id"), os.path.basename(path)), **result)
        problem = ("no stamp file %s" % path) if stamp is None else (
            "the stamp file %s holds no passing stamp of this set from %s" % (path, "/".join(self.p["accept_from"])))
        if self.p["staging_url"]:
            found = self.staging_event(checksum)
            if found:
                return dict(changed=False, source="staging_events", stamp=found,
                            impact_profile=found.pop("impact", None) or [],
                            msg="the set %s (up to %s) passed verify on %s in run %s (staging's "
                            "migrations.events)" % (checksum[:12], version, found.get("target"),
                                                    found.get("run_id")), **result)
            problem += ", and no promotion_stamp event with this checksum in %s's migrations.events" % (
                describe_target(self.p["staging_url"]))
        if self.p["override"]:
            result["override"] = True
            warning = ("promotion_override=true: %s receives the set %s (up to %s) that has no passing staging "
                       "stamp (%s); logged as a promotion_override event" % (self.target, checksum[:12], version,
                                                                             problem))
            if not self.check_mode:
                conn = connect(self.url)
                try:
                    with conn.cursor() as cur:
                        ensure_records(cur)
                        log_event(cur, self.p["run_id"], "promotion_override", "overridden", version=version,
                                  detail={"set_checksum": checksum, "files": self.files_list(files),
                                          "reason": problem})
                finally:
                    conn.close()
            return dict(changed=not self.check_mode, source="override", msg=warning, warnings=[warning], **result)
        self.fail("promotion: refusing to migrate %s: the migration set %s (%s, up to %s) has not passed verify on "
                  "%s (%s). Run it on staging first: `%s`, then "
                  "commit promotions/%s.json; or, deliberately, add '-e promotion_override=true' (logged)."
                  % (self.target, checksum, ", ".join(n for _v, n, _s in files), version,
                     "/".join(self.p["accept_from"]), problem,
                     playbook_command("migrate", "staging", ("-e migrate_target=%s" % self.p["target"])
                                      if self.p["target"] else "", carry=False), checksum),
                  set_checksum=checksum, version=version, stamp_file=path)

    def valid_stamp(self, stamp, checksum):
        if not isinstance(stamp, dict) or stamp.get("set_checksum") != checksum:
            return None
        # The file list is part of the stamp: recompute, so an edited stamp can't vouch for another set.
        listed = [(f.get("version"), f.get("file"), f.get("sha256")) for f in stamp.get("files", [])
                  if isinstance(f, dict)]
        if set_checksum(listed) != checksum:
            return None
        for entry in reversed(stamp.get("stamps", [])):
            if (isinstance(entry, dict) and entry.get("environment") in self.p["accept_from"]
                    and str(entry.get("verify", "")).lower() in PASSED):
                return entry
        return None

    def staging_event(self, checksum):
        conn = connect(self.p["staging_url"])
        try:
            with conn.cursor() as cur:
                if not records_exist(cur):
                    return None
                cur.execute("SELECT run_id, at::text, actor, detail->>'environment', detail->'impact'"
                            " FROM migrations.events"
                            " WHERE action = 'promotion_stamp' AND outcome = 'recorded'"
                            " AND detail->>'set_checksum' = %s ORDER BY id DESC LIMIT 1", (checksum,))
                row = cur.fetchone()
        finally:
            conn.close()
        if not row:
            return None
        return {"run_id": row[0], "recorded_at": row[1], "actor": row[2], "environment": row[3] or "staging",
                "target": describe_target(self.p["staging_url"]), "verify": "passed",
                "impact": row[4] if isinstance(row[4], list) else []}


ARGUMENT_SPEC = dict(
    state=dict(type="str", required=True, choices=["record", "check"]),
    database_url=dict(type="str", required=True, no_log=True),
    migrations_dir=dict(type="path", required=True),
    target=dict(type="str", default=""),
    stamp_dir=dict(type="path", required=True),
    environment=dict(type="str", default="staging"),
    accept_from=dict(type="list", elements="str", default=["staging"]),
    host=dict(type="str", default=""),
    run_id=dict(type="str", required=True),
    run_options=RUN_OPTIONS_SPEC,
    staging_url=dict(type="str", default="", no_log=True),
    override=dict(type="bool", default=False),
    impact_profile=dict(type="list", elements="dict", default=[]),
)
SPEC_OPTIONS = {}


def run(params, check_mode=False):
    """Record or check the stamp; every failure is a LedgerError that names the state and the target."""
    params = dict(params)
    target = params["target"]
    if target in ("latest", "head"):
        params["target"] = ""
    elif target and not re.match(r"^[0-9]{4}$", target):
        raise LedgerError("promotion: target must be a 4-digit version such as 0011 (got %r)" % target)
    promotion = Promotion(params, check_mode)
    what = "promotion %s on %s" % (params["state"], promotion.target)
    try:
        return promotion.record() if params["state"] == "record" else promotion.check()
    except _Refusal:
        raise
    except LedgerError as exc:
        raise LedgerError("%s: %s" % (what, exc.msg), **dict((k, v) for k, v in exc.fields.items() if k != "target"))
    except Exception as exc:  # noqa: BLE001 - a message, never a traceback
        if psycopg2 is not None and isinstance(exc, psycopg2.Error):
            err = pg_error(exc)
            raise LedgerError("%s: %s" % (what, format_pg_error(err)), sqlstate=err["sqlstate"])
        raise LedgerError("%s: %s: %s" % (what, type(exc).__name__, exc))


def result_of(params, check_mode=False):
    """The module's result for validated params, failures included (failed=True); never raises."""
    return module_result("ledger_promotion", run, params, check_mode)


def main():
    run_module(ARGUMENT_SPEC, result_of, SPEC_OPTIONS)


if __name__ == "__main__":
    main()
