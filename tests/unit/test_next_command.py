"""The next command (ledger_next): exact, shell-safe, with the failed run's -i, -l and each -e."""

from __future__ import annotations

import shlex

import pytest
from ansible_collections.arrakis.ledger.plugins.module_utils import ledger_next
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_next import (
    PlaybookAdvice,
    playbook_command,
    run_options_from_cli,
    use_run_options,
)

CLI = {"inventory": ["/srv/my inventory.yml"], "subset": "staging", "vault_ids": ["production@prompt"],
       "extra_vars": ("migrations_dir=/x y", "precheck_rehearse=false", "rollback_to=0010", "@vars.yml",
                      '{"a": "it\'s"}')}


def test_the_run_options_come_from_the_command_line_and_the_default_inventory_is_left_out():
    assert run_options_from_cli(CLI, default_inventory=["/p/inventory/local"]) == [
        "-i", "/srv/my inventory.yml", "-l", "staging", "-e", "migrations_dir=/x y", "-e", "precheck_rehearse=false",
        "-e", "rollback_to=0010", "-e", "@vars.yml", "-e", '{"a": "it\'s"}', "--vault-id", "production@prompt"]
    secret = run_options_from_cli({"extra_vars": ("database_url=postgresql://u:s3cret@db/ledger",)})
    assert secret == ["-e", "database_url=postgresql://u:********@db/ledger"]
    assert run_options_from_cli({"inventory": ["/p/inventory/local"], "subset": "local"},
                                default_inventory=["/p/inventory/local"]) == ["-l", "local"]


def test_a_command_pastes_back_to_exactly_the_run_options_plus_its_own():
    use_run_options(run_options_from_cli(CLI))
    try:
        cmd = PlaybookAdvice("ignored").rollback("-e rollback_to=0009")
        argv = shlex.split(cmd)
        # The command's own -e rollback_to wins over the run's; every other option is carried once.
        assert argv == ["ansible-playbook", "playbooks/rollback.yml", "-i", "/srv/my inventory.yml", "-l", "staging",
                        "-e", "migrations_dir=/x y", "-e", "precheck_rehearse=false", "-e", "@vars.yml",
                        "-e", '{"a": "it\'s"}', "--vault-id", "production@prompt", "-e", "rollback_to=0009"]
        assert "''" not in cmd.replace("'\"'\"'", "")  # no YAML-doubled quotes
    finally:
        use_run_options(None)


def test_without_run_options_a_command_names_the_limit_and_keeps_placeholders_readable():
    assert ledger_next._RUN["options"] is None
    assert playbook_command("migrate", "local") == "ansible-playbook playbooks/migrate.yml -l local"
    assert playbook_command("backup") == "ansible-playbook playbooks/backup.yml -l <limit>"
    assert PlaybookAdvice("a b").rollback("-e rollback_to=VERSION|base") == \
        "ansible-playbook playbooks/rollback.yml -l 'a b' -e rollback_to=VERSION|base"


def test_a_value_with_a_space_stays_one_argument_and_a_psql_command_quotes_each_name():
    use_run_options(run_options_from_cli(CLI))
    try:
        cmd = playbook_command("rollback", None, "-e rollback_mode=restore %s"
                               % ledger_next.extra_var("backup_file", "/b k/x.dump"))
        # A value Ansible's k=v parsing would cut at the space goes as JSON.
        assert shlex.split(cmd)[-4:] == ["-e", "rollback_mode=restore", "-e", '{"backup_file": "/b k/x.dump"}']
        # A command for another environment (staging, from a production run) carries none of this run's options.
        assert playbook_command("migrate", "staging", "-e migrate_target=0010", carry=False) == \
            "ansible-playbook playbooks/migrate.yml -l staging -e migrate_target=0010"
    finally:
        use_run_options(None)
    assert playbook_command("status", "<this host>") == "ansible-playbook playbooks/status.yml -l <this host>"
    psql = ledger_next.psql_command("db 1", 5432, "mig", "postgres", 'DROP DATABASE "l""x" WITH (FORCE)')
    assert shlex.split(psql) == ["psql", "-h", "db 1", "-p", "5432", "-U", "mig", "-d", "postgres",
                                 "-c", 'DROP DATABASE "l""x" WITH (FORCE)']


def test_a_cleanup_command_carries_the_run_options_but_none_of_its_rollback_choices():
    """Said by a restore run, a cleanup command that carried -e rollback_mode=restore would restore again;
    one that carried the run's other cleanup flags would drop more than it names."""
    use_run_options(["-i", "inv", "-l", "prod", "-e", "rollback_mode=restore", "-e", "backup_file=/b/x.dump",
                     "-e", "rollback_to=0009", "-e", "rollback_drop_leftovers=true", "-e", "rollback_drop_kept=true",
                     "-e", "rollback_allow_connections=true", "-e", "database_url=postgresql://u:********@db/l"])
    try:
        assert shlex.split(ledger_next.cleanup_command("ignored", "-e rollback_drop_kept=true")) == [
            "ansible-playbook", "playbooks/rollback.yml", "-i", "inv", "-l", "prod", "-e", "backup_file=/b/x.dump",
            "-e", "database_url=postgresql://u:********@db/l", "-e", "rollback_drop_kept=true"]
    finally:
        use_run_options(None)
    assert ledger_next.cleanup_command(None, "-e rollback_drop_leftovers=true") == \
        "ansible-playbook playbooks/rollback.yml -l <limit> -e rollback_drop_leftovers=true"


@pytest.mark.parametrize("hidden", [
    ["-e", "@restore-vars.yml"],  # a file: what it sets can't be read here
    ["-e", '{"rollback_mode": "restore", "rollback_allow_data_loss": true}'],
    ["--extra-vars", "backup_file=/b/x.dump rollback_mode=restore"],  # several pairs in one
    ["-e", "rollback_mode=restore database_url=postgresql://u@db/other"],  # the target goes with them: kept
])
def test_a_cleanup_command_restates_the_choices_an_extra_var_it_carries_may_hide(hidden):
    """Carried as they are, these would restore again: every choice is restated after them with the value that
    chooses nothing (the later -e wins), except the cleanup's own, which comes last."""
    use_run_options(["-i", "inv", "-l", "prod", *hidden])
    try:
        assert shlex.split(ledger_next.cleanup_command("ignored", "-e rollback_drop_kept=true")) == [
            "ansible-playbook", "playbooks/rollback.yml", "-i", "inv", "-l", "prod", *hidden,
            "-e", "rollback_mode=revert", "-e", "rollback_to=", "-e", "rollback_drop_leftovers=false",
            "-e", "rollback_allow_connections=false", "-e", "rollback_drop_kept=true"]
    finally:
        use_run_options(None)


def test_the_restated_choices_are_the_rollback_roles_defaults():
    import yaml
    from ledgertest import ROOT
    defaults = yaml.safe_load((ROOT / "roles" / "rollback" / "defaults" / "main.yml").read_text())
    for key, value in ledger_next._ROLLBACK_CHOICES.items():
        assert str(defaults[key]).lower() == value, key
