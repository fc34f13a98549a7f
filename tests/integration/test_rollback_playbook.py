"""playbooks/rollback.yml and on_failure=rollback of playbooks/migrate.yml, through ansible-playbook.

A user's own inventory whose host sets database_url (and backup_dir), narrowed with -l. The
migration set is a copy of files/migrations plus a 0012 that fails at apply time (division by
zero on its line 3); precheck_rehearse=false lets it reach the apply stage.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pghelpers import history, q
from ledgertest import RUNBOOK_SET

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = RUNBOOK_SET  # the runbook's 0008-0011, whatever else files/migrations holds
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
FAILING_0012 = "-- 0012: fails at apply time, on purpose\nCREATE TABLE public.rb_probe (id int);\nSELECT 1 / 0;\n"




class Runner:
    def __init__(self, tmp_path, url):
        self.tmp = tmp_path
        self.url = url
        self.migrations = tmp_path / "migrations"
        shutil.copytree(MIGRATIONS, self.migrations)
        (self.migrations / "0012_fails_on_purpose.sql").write_text(FAILING_0012)
        self.inventory = tmp_path / "inventory.yml"
        self.inventory.write_text("all:\n  hosts:\n    rbdb:\n      database_url: %s\n      backup_dir: %s\n"
                                  % (url, tmp_path / "backups"))

    def options(self):
        """The options every run of these tests is given (a next command carries them)."""
        return ["-i", str(self.inventory), "-l", "rbdb",
                "-e", "migrations_dir=%s" % self.migrations, "-e", "report_dir=%s" % (self.tmp / "reports")]

    def env(self, verbosity):
        env = dict(os.environ, ANSIBLE_VERBOSITY=str(verbosity),
                   ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_HOME=str(self.tmp / ".ansible"),
                   ANSIBLE_NOCOLOR="1", PATH=str(PLAYBOOK.parent) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("DATABASE_URL", None)
        return env

    def run(self, playbook, *args, verbosity=1):
        # -v (the default callback's full results): these tests read the modules' messages and results;
        # tests/integration/test_screen.py covers the operator's screen at default verbosity.
        cmd = [str(PLAYBOOK), "playbooks/%s" % playbook, *self.options(), *args]
        res = subprocess.run(cmd, cwd=ROOT, env=self.env(verbosity), capture_output=True, text=True, timeout=300,
                             check=False)
        # Messages are wrapped by the YAML callback: compare them with whitespace folded.
        return res.returncode, " ".join((res.stdout + res.stderr).split())

    def paste(self, command):
        """Run a printed command as an operator pastes it into a shell."""
        res = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env(1), capture_output=True, text=True,
                             timeout=300, check=False)
        return res.returncode, " ".join((res.stdout + res.stderr).split())


@pytest.fixture
def runner(tmp_path, empty_db, pg_cluster):
    r = Runner(tmp_path, empty_db)
    yield r
    name = empty_db.rsplit("/", 1)[1]
    for (db,) in q(pg_cluster.url(), "SELECT datname FROM pg_database WHERE datname LIKE %s",
                   (name + "\\_pre\\_restore\\_%",)):
        pg_cluster.drop_db(db)


def test_on_failure_rollback_reverts_what_the_run_applied_and_still_fails(runner):
    rc, out = runner.run("migrate.yml", "-e", "on_failure=rollback", "-e", "precheck_rehearse=false")
    assert rc != 0, out
    # The failure is still the migration's, with its file, line and SQLSTATE.
    assert "0012_fails_on_purpose.sql line 3: SQLSTATE 22012" in out
    assert "on_failure=rollback: reverted 0011, 0010, 0009, 0008" in out
    # This run applied 0008-0011 from scratch: all of them are reverted; 0012 never was applied.
    assert history(runner.url) == []
    assert q(runner.url, "SELECT to_regclass('public.rb_probe'), to_regclass('public.credit_lots'),"
                         " to_regnamespace('app')") == [(None, None, None)]
    rows = q(runner.url, "SELECT action, version, outcome, run_id FROM migrations.events"
                         " WHERE action IN ('apply', 'revert') ORDER BY id")
    assert [(a, v, o) for a, v, o, _ in rows] == [
        ("apply", "0008", "ok"), ("apply", "0009", "ok"), ("apply", "0010", "ok"), ("apply", "0011", "ok"),
        ("apply", "0012", "failed"),
        ("revert", "0011", "ok"), ("revert", "0010", "ok"), ("revert", "0009", "ok"), ("revert", "0008", "ok")]
    assert len(set(r[3] for r in rows)) == 1, "one run id for the apply and its automatic revert"


def test_on_failure_rollback_reverts_only_this_runs_migrations(runner):
    rc, out = runner.run("migrate.yml", "-e", "migrate_target=0009")
    assert rc == 0, out
    rc, out = runner.run("migrate.yml", "-e", "on_failure=rollback", "-e", "precheck_rehearse=false")
    assert rc != 0, out
    assert "on_failure=rollback: reverted 0011, 0010" in out
    assert history(runner.url) == ["0008", "0009"]


def test_on_failure_rollback_never_restores_silently_when_a_down_script_is_missing(runner, pg_cluster):
    """A restore would discard every write since the backup: without rollback_allow_data_loss the target stays
    as the failure left it, the failure is still reported, and the exact restore command is printed (and works)."""
    next(runner.migrations.glob("0010_*.down.sql")).unlink()
    # The operator's screen (default verbosity): the restore command is said once.
    rc, out = runner.run("migrate.yml", "-e", "on_failure=rollback", "-e", "precheck_rehearse=false", verbosity=0)
    assert rc != 0, out
    assert "0012_fails_on_purpose.sql line 3: SQLSTATE 22012" in out
    assert "on_failure=rollback did NOT roll back rbdb: the revert is impossible, there is no down script for 0010" \
        in out
    assert "expected 0010_<name>.down.sql" in out and "not done without rollback_allow_data_loss=true" in out
    assert "left as the failure left it, at version 0011" in out
    backup_file = next((runner.tmp / "backups").glob("*.dump"))
    # It carries this run's -i, -l and each -e (ledger_next, the one home of next commands), quoted for a shell.
    argv = ["ansible-playbook", "playbooks/rollback.yml", *runner.options(), "-e", "on_failure=rollback",
            "-e", "precheck_rehearse=false", "-e", "rollback_mode=restore", "-e", "backup_file=%s" % backup_file]
    command = shlex.join(argv)
    assert out.count(command) == 1 and out.count("rollback_mode=restore") == 1, out
    assert history(runner.url) == ["0008", "0009", "0010", "0011"]
    assert q(runner.url, "SELECT count(*) FROM migrations.events WHERE action = 'restore'") == [(0,)]
    name = runner.url.rsplit("/", 1)[1]
    assert q(pg_cluster.url(), "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
             (name + "\\_%restore\\_%",)) == [(0,)]

    # The printed command, pasted into a shell, does what it says.
    rc, out = runner.paste(command)
    assert rc == 0, out
    assert "restored %s" % backup_file in out
    assert history(runner.url) == []


def test_on_failure_rollback_restores_the_runs_backup_when_allowed_to_lose_data(runner, pg_cluster):
    next(runner.migrations.glob("0010_*.down.sql")).unlink()
    rc, out = runner.run("migrate.yml", "-e", "on_failure=rollback", "-e", "precheck_rehearse=false",
                         "-e", "rollback_allow_data_loss=true")
    assert rc != 0, out
    assert "SQLSTATE 22012" in out
    assert "no down script for 0010" in out and "restoring the backup this run took instead" in out
    assert "on_failure=rollback: restored " in out
    assert history(runner.url) == []
    assert q(runner.url, "SELECT to_regclass('public.credit_lots') IS NULL")[0][0] is True
    assert q(runner.url, "SELECT outcome FROM migrations.events WHERE action = 'restore'") == [("ok",)]
    # The database as the failure left it (0008-0011 applied) is kept for inspection.
    name = runner.url.rsplit("/", 1)[1]
    kept = q(pg_cluster.url(), "SELECT datname FROM pg_database WHERE datname LIKE %s",
             (name + "\\_pre\\_restore\\_%",))
    assert len(kept) == 1
    assert history(pg_cluster.url(kept[0][0])) == ["0008", "0009", "0010", "0011"]


def test_on_failure_stop_keeps_the_last_good_version_and_its_command_works(runner):
    rc, out = runner.run("migrate.yml", "-e", "precheck_rehearse=false")
    assert rc != 0, out
    assert history(runner.url) == ["0008", "0009", "0010", "0011"]
    # The failed run's options (-i, -l, each -e), then the rollback's own.
    command = ("ansible-playbook playbooks/rollback.yml -i %s -l rbdb -e migrations_dir=%s -e report_dir=%s"
               " -e precheck_rehearse=false -e rollback_to=base"
               % (runner.inventory, runner.migrations, runner.tmp / "reports"))
    assert command in out

    # --check says what it would revert and changes nothing.
    rc, out = runner.run("rollback.yml", "-e", "rollback_to=base", "--check")
    assert rc == 0, out
    assert "would revert 0011, 0010, 0009, 0008" in out
    assert history(runner.url) == ["0008", "0009", "0010", "0011"]

    rc, out = runner.run("rollback.yml", "-e", "rollback_to=base")
    assert rc == 0, out
    assert "reverted 0011, 0010, 0009, 0008" in out
    assert history(runner.url) == []


def test_rollback_refuses_without_a_way_back(runner):
    rc, out = runner.run("rollback.yml")
    assert rc != 0
    assert "Say which way back" in out


def test_rollback_drops_leftovers_and_allows_connections_with_consent(runner, pg_cluster):
    """What an interrupted restore leaves: a scratch copy, a kept database, a target refusing connections."""
    name = runner.url.rsplit("/", 1)[1]
    left = [name + "_restore_20260101000000_abcdef", name + "_pre_restore_20260101000000_abcdef"]
    for db in left:
        q(pg_cluster.url(), 'CREATE DATABASE "%s"' % db)
    q(pg_cluster.url(), 'ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % name)
    try:
        rc, out = runner.run("rollback.yml", "-e", "rollback_drop_leftovers=true", "-e",
                             "rollback_allow_connections=true")
        assert rc == 0, out
        assert "dropped: " + left[0] in out
        assert q(pg_cluster.url(), "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,))[0][0] is True
        # The scratch copy is gone; the kept database stays, listed with the command that drops it: the
        # run's options without its cleanup flags, plus rollback_drop_kept.
        assert q(pg_cluster.url(), "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (left,)) == [(left[1],)]
        assert "left as they are (not asked to drop): %s (kept by a restore, " % left[1] in out
        drop_kept = shlex.join(["ansible-playbook", "playbooks/rollback.yml", *runner.options(),
                                "-e", "rollback_drop_kept=true"])
        assert "which no other database holds: dropping it loses them; drop the kept databases only once none of " \
               "those rows is wanted: %s" % drop_kept in out, out
        assert "rollback_drop_leftovers=true -e rollback_drop_kept" not in out

        # That command (runner.run adds the same playbook and options): alone it only cleans up, and drops it.
        rc, out = runner.run("rollback.yml", "-e", "rollback_drop_kept=true")
        assert rc == 0, out
        assert "dropped: " + left[1] in out and "Say which way back" not in out
        assert q(pg_cluster.url(), "SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", (left,))[0][0] == 0
    finally:
        q(pg_cluster.url(), 'ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % name)
        for db in left:
            pg_cluster.drop_db(db)


def test_a_cleanup_command_said_by_a_run_with_a_vars_file_does_only_what_it_names(runner, pg_cluster):
    """The run's `-e @file` sets rollback_drop_leftovers (it could as well set rollback_mode=restore): the
    printed command carries the file and restates every choice after it, so pasted, it drops the kept
    database it names and not the scratch copy that appeared meanwhile."""
    name = runner.url.rsplit("/", 1)[1]
    scratch, kept = name + "_restore_20260101000000_abcdef", name + "_pre_restore_20260101000000_abcdef"
    later = name + "_restore_20260102000000_fedcba"
    varsfile = runner.tmp / "cleanup.yml"
    varsfile.write_text("rollback_drop_leftovers: true\n")
    for db in (scratch, kept):
        q(pg_cluster.url(), 'CREATE DATABASE "%s"' % db)
    try:
        rc, out = runner.run("rollback.yml", "-e", "@%s" % varsfile)
        assert rc == 0 and "dropped: " + scratch in out, out
        drop_kept = shlex.join(["ansible-playbook", "playbooks/rollback.yml", *runner.options(), "-e",
                                "@%s" % varsfile, "-e", "rollback_mode=revert", "-e", "rollback_to=", "-e",
                                "rollback_drop_leftovers=false", "-e", "rollback_allow_connections=false",
                                "-e", "rollback_drop_kept=true"])
        assert drop_kept in out, out
        q(pg_cluster.url(), 'CREATE DATABASE "%s"' % later)
        rc, out = runner.paste(drop_kept)
        assert rc == 0 and "dropped: " + kept in out, out
        assert q(pg_cluster.url(), "SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                 ([scratch, kept, later],)) == [(later,)]
    finally:
        for db in (scratch, kept, later):
            pg_cluster.drop_db(db)
