"""The ledger_* action plugins run the module in-process (plugins/plugin_utils/ledger_inprocess.py).

In-process runs must be indistinguishable from the module: the same validation errors, no_log
values masked, check mode honoured, the same failure messages and `changed`, plain JSON types,
no thread or connection left behind. Each property is compared with the module's own main()
(AnsibleModule, patched arguments) or, through ansible, with the module run the usual way
(an interpreter wrapper that is not the controller's Python forces the fallback).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import psycopg2
import pytest
from ledgertest import inprocess, module, via_main
from ledgertest import SECRET
from pghelpers import other_sessions


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def plain_types(obj):
    """Every value is exactly a JSON type (no tuple, no str subclass, no custom object)."""
    if type(obj) is dict:
        return all(type(k) is str and plain_types(v) for k, v in obj.items())
    if type(obj) is list:
        return all(plain_types(v) for v in obj)
    return type(obj) in (str, int, float, bool, type(None))


def migrations(tmp_path, files):
    d = tmp_path / "migrations"
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return str(d)


GOOD = {"0001_one.sql": "CREATE TABLE one (i int);\n", "0002_two.sql": "CREATE TABLE two (i int);\n"}
BROKEN = dict(GOOD, **{"0003_broken.sql": "CREATE TABLE three (i int);\nSELECT 1 /\n       0;\n"})


# --------------------------------------------------------------------------- validation


# --------------------------------------------------------------------------- no_log

def test_no_log_values_are_removed_wherever_they_appear(tmp_path, empty_db):
    # The secret is a no_log option's value (direct_url) and also inside another option's value,
    # so the failure message (the missing migrations directory) and the invocation carry it.
    args = {"database_url": empty_db, "direct_url": SECRET, "migrations_dir": str(tmp_path / SECRET),
            "limit": SECRET}
    params, no_log, error = inprocess.validate(module("ledger_migrate"), "ledger_migrate", args)
    assert error is None and SECRET in no_log
    raw = module("ledger_migrate").result_of(params)
    assert raw["failed"] and SECRET in json.dumps(raw)  # unmasked, the module's result carries it

    got = inprocess.call("ledger_migrate", args, check_mode=False)
    expected = via_main("ledger_migrate", args)
    assert SECRET not in json.dumps(got)
    assert got["invocation"]["module_args"]["direct_url"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert got["invocation"]["module_args"]["limit"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert "********" in got["msg"]
    assert got == expected


# --------------------------------------------------------------------------- results

def test_check_mode_is_passed_and_results_are_plain_json(tmp_path, empty_db):
    d = migrations(tmp_path, GOOD)
    args = {"database_url": empty_db, "migrations_dir": d, "limit": "testenv"}
    rehearsal = inprocess.call("ledger_migrate", args, check_mode=True)
    assert not rehearsal.get("failed") and rehearsal["pending"] == ["0001", "0002"]
    conn = psycopg2.connect(empty_db)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('migrations.history') IS NULL AND to_regclass('public.one') IS NULL")
        assert cur.fetchone()[0]  # the rehearsal wrote nothing
    conn.close()

    applied = inprocess.call("ledger_migrate", args, check_mode=False)
    assert applied["changed"] is True and applied["applied_versions"] == ["0001", "0002"]
    assert plain_types(applied)
    # The same keys and types as the module's own result, run again on the now-current target.
    again_inprocess = inprocess.call("ledger_migrate", dict(args, action="status"), check_mode=False)
    again_module = via_main("ledger_migrate", dict(args, action="status"))
    assert plain_types(again_inprocess)
    assert again_inprocess == again_module


def test_a_failed_apply_reports_changed_and_leaves_no_thread_or_connection(tmp_path, empty_db):
    d = migrations(tmp_path, BROKEN)
    args = {"database_url": empty_db, "migrations_dir": d, "limit": "testenv"}
    got = inprocess.call("ledger_migrate", args, check_mode=False)
    assert got["failed"] is True
    assert got["changed"] is True  # 0001 and 0002 were applied before 0003 failed
    assert "0003_broken.sql" in got["msg"] and "22012" in got["msg"]
    assert got["changed"] == module("ledger_migrate").failure_changed("apply", False, got)
    assert not [t for t in threading.enumerate() if t.name.startswith("ledger-")]
    assert other_sessions(empty_db) == []

    # The module says the same of the same failure (0003 still pending).
    expected = via_main("ledger_migrate", args)
    got = inprocess.call("ledger_migrate", args, check_mode=False)
    for key in ("failed", "changed", "msg", "file", "line", "sqlstate"):
        assert got.get(key) == expected.get(key), key


def test_an_unexpected_exception_gives_the_modules_message(monkeypatch, empty_db, tmp_path):
    mod = module("ledger_migrate")

    def boom(p, check_mode=False):
        raise RuntimeError("boom at postgresql://u:%s@h/db" % SECRET)

    monkeypatch.setattr(mod, "run", boom)
    args = {"database_url": empty_db, "migrations_dir": str(tmp_path)}
    got = inprocess.call("ledger_migrate", args, check_mode=False)
    expected = via_main("ledger_migrate", args)
    assert got["failed"] is True
    assert got["msg"] == expected["msg"]
    assert got["msg"].startswith("ledger_migrate failed unexpectedly on ") and "RuntimeError: boom" in got["msg"]
    assert SECRET not in got["msg"] and "Traceback" not in json.dumps(got)


def test_a_verify_failure_is_a_failed_result_not_an_exception(empty_db):
    got = inprocess.call("ledger_verify", {"database_url": empty_db.replace("/t_", "/missing_t_"),
                                           "limit": "testenv"}, check_mode=False)
    expected = via_main("ledger_verify", {"database_url": empty_db.replace("/t_", "/missing_t_"),
                                          "limit": "testenv"})
    assert got["failed"] is True and got["msg"] == expected["msg"]
    assert "Next: check database_url" in got["msg"]


# --------------------------------------------------------------------------- through ansible

def _ansible(tmp_path, module_name, args, interpreter, check=False):
    """One ad-hoc call on localhost (local connection); its JSON result."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
               ANSIBLE_HOME=str(tmp_path / ".ansible"))
    cmd = [str(BIN / "ansible"), "all", "-i", "localhost,", "-c", "local", "-m", module_name,
           "-a", json.dumps(args), "-e", "ansible_python_interpreter=%s" % interpreter, "-vvv"]
    if check:
        cmd.append("--check")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    match = re.search(r'^\{\n\s+"custom_stats"', proc.stdout, re.M)
    assert match, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.JSONDecoder().raw_decode(proc.stdout[match.start():])[0]
    result = data["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return result, proc.stdout + proc.stderr


@pytest.fixture()
def wrapper(tmp_path):
    """An interpreter that is not the controller's own Python (a script that execs it)."""
    path = tmp_path / "python-wrapper"
    path.write_text("#!/bin/sh\nexec %s \"$@\"\n" % sys.executable)
    path.chmod(0o755)
    return str(path)


COMPARED = ("failed", "changed", "msg", "applied_versions", "pending", "current", "invocation")


@pytest.mark.parametrize("case", ["unknown_option", "check_mode", "apply", "status_drift"])
def test_in_process_and_module_runs_give_the_same_result(tmp_path, pg_cluster, wrapper, case):
    results = []
    for interpreter in (sys.executable, wrapper):
        db = pg_cluster.create_db()
        try:
            url = pg_cluster.url(db)
            d = migrations(tmp_path / ("m%d" % len(results)), GOOD) if case != "unknown_option" else "/m"
            args = {"database_url": url, "migrations_dir": d, "limit": "testenv"}
            if case == "unknown_option":
                args["bogus"] = 1
            if case == "status_drift":
                # Applied, then the file edited: status with fail_on_drift fails and names the drift.
                inprocess.call("ledger_migrate", args, check_mode=False)
                Path(d, "0002_two.sql").write_text("CREATE TABLE two (i bigint);\n")
                args.update(action="status", fail_on_drift=True)
            result, output = _ansible(tmp_path, "arrakis.ledger.ledger_migrate", args, interpreter, check=case == "check_mode")
            in_process = "ledger_migrate: running the module in-process" in output
            assert in_process == (interpreter == sys.executable), output[-2000:]
            assert ("AnsiballZ_ledger_migrate" in output) == (interpreter != sys.executable)
            for key in ("database_url",):
                assert result["invocation"]["module_args"][key] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
            result["msg"] = re.sub(r"t_[0-9a-f]{10}", "DB", result.get("msg", ""))
            result["msg"] = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "TIME", result["msg"])
            result["msg"] = re.sub(r"\b\d+ ms\b", "N ms", result["msg"])
            # The next commands carry each run's own -e ansible_python_interpreter.
            result["msg"] = result["msg"].replace(str(interpreter), "INTERPRETER")
            result["msg"] = re.sub(r"/m\d/", "/mN/", result["msg"]).replace(str(tmp_path), "TMP")
            inv = result["invocation"]["module_args"]
            inv["migrations_dir"] = None
            # The command lines differ in their -e ansible_python_interpreter (the next commands' options).
            assert ["-e", "ansible_python_interpreter=%s" % interpreter] == inv["run_options"][-2:]
            inv["run_options"] = None
            results.append(({k: result.get(k) for k in COMPARED}, db))
        finally:
            pg_cluster.drop_db(db)
    (first, _), (second, _) = results
    assert first["msg"].splitlines() == second["msg"].splitlines()
    assert first == second
    assert bool(first["failed"]) == (case in ("unknown_option", "status_drift"))


def test_backup_progress_lines_still_appear_when_the_module_runs_in_process(empty_db, tmp_path):
    from test_precheck_playbook import inventory, playbook

    conn = psycopg2.connect(empty_db)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE public.things AS SELECT g AS id FROM generate_series(1, 20000) g")
    conn.close()
    rc, out = playbook(["-i", str(inventory(tmp_path, empty_db)), "playbooks/backup.yml", "-l", "mydb", "-vvv",
                        "-e", "backup_dir=%s" % (tmp_path / "backups"), "-e", "backup_verify=restore",
                        "-e", "backup_progress_interval=0.05"], tmp_path)
    assert rc == 0, out
    assert "ledger_backup: running the module in-process" in out
    assert "AnsiballZ_ledger_backup" not in out
    assert re.search(r"\[mydb\] backup: \w+", out), out[-3000:]
