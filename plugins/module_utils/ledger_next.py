# -*- coding: utf-8 -*-
"""The next command an operator runs: the one home of its wording and of the options it carries.

The engine's core says *what* comes next (run the migrate stage again, revert to a version,
accept a checksum, show the status) through an Advice object; this is the module layer's
wording of it. Every command is built here, as an argument list joined with shlex (so a value
with a space or a quote is single-quoted once and can be pasted), and carries the options of
the run that failed: its -i, -l, each -e and its vault options. The action plugins read those
from ansible-playbook's command line (run_options_from_cli) and pass them to the module as its
`run_options` argument; the module tail (ledger_module.module_result) makes them the options
of every command built while the module runs. Without them (a module called by another
playbook, a test) a command carries `-l <limit>`.
"""

from __future__ import annotations

import json
import re
import shlex

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_common import redact
from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import Advice

# `<limit>`, `<this host>`, `rollback_to=VERSION|base`: written as they are, for the operator to replace.
PLACEHOLDER = re.compile(r"<[a-z_ ]+>|[a-z_]+=VERSION\|base")

# A value Ansible's k=v parsing of -e reads as it is written: no space, quote or backslash.
_KV_SAFE = re.compile(r"[^\s'\"\\]*")

# The options of the current module call (set by use_run_options; one module call per process).
_RUN = {"options": None}

# The rollback playbook's variables that choose what it does, with the values that choose nothing (its role's
# defaults): cleanup_command carries none of the run's, and restates these where the run's options may hide one.
_ROLLBACK_CHOICES = {"rollback_mode": "revert", "rollback_to": "", "rollback_drop_leftovers": "false",
                     "rollback_drop_kept": "false", "rollback_allow_connections": "false"}

# run_options: the module argument every ledger_* module with next commands takes.
RUN_OPTIONS_SPEC = dict(type="list", elements="str", default=None)


def run_options_from_cli(cliargs, default_inventory=None):
    """The options of this ansible-playbook run a re-run needs: -i (when given), -l, each -e, vault options.

    A password in an -e value is redacted: the command then says ******** where the operator types it.

    cliargs is ansible.context.CLIARGS (or a dict of the same keys); default_inventory the
    inventory that applies without -i (ansible.cfg's), which is left out.
    """
    out = []
    inventory = list(cliargs.get("inventory") or [])
    if inventory and inventory != list(default_inventory or []):
        for source in inventory:
            out += ["-i", source]
    if cliargs.get("subset"):
        out += ["-l", cliargs["subset"]]
    for value in cliargs.get("extra_vars") or ():
        # A password given with -e never reaches a result, an event or the screen (the one redaction rule).
        out += ["-e", redact(value)]
    for vault_id in cliargs.get("vault_ids") or ():
        out += ["--vault-id", vault_id]
    for path in cliargs.get("vault_password_files") or ():
        out += ["--vault-password-file", path]
    if cliargs.get("ask_vault_pass"):
        out.append("--ask-vault-pass")
    return out


def use_run_options(options):
    """Make `options` (a list of argv tokens, or None) the options of every command built from now on."""
    _RUN["options"] = list(options) if options else None


def _extra_keys(tokens):
    """The variable names that the command's own `-e k=v` (or extra_var's `-e '{"k": "v"}'`) tokens set."""
    keys = set()
    for i, tok in enumerate(tokens):
        if tok == "-e" and i + 1 < len(tokens):
            value = tokens[i + 1]
            if _single_pair(value):
                keys.add(value.split("=", 1)[0])
            elif value.startswith("{"):  # extra_var's JSON form
                try:
                    data = json.loads(value)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    keys.update(data)
    return keys


def _single_pair(value):
    """Whether an -e value is one `k=v` (a file, inline JSON or YAML, or several pairs are not)."""
    if "=" not in value or value.startswith(("@", "{", "[")):
        return False
    try:
        return len(shlex.split(value)) == 1
    except ValueError:
        return False


def _without(options, keys):
    """The run's options minus each `-e k=v` that the command sets itself (only a single pair is taken out: the
    other pairs of one -e may be the target's, e.g. its database_url)."""
    out, i = [], 0
    while i < len(options):
        tok = options[i]
        if tok in ("-e", "--extra-vars") and i + 1 < len(options):
            value = options[i + 1]
            if _single_pair(value) and value.split("=", 1)[0] in keys:
                i += 2
                continue
            out += [tok, value]
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def extra_var(name, value):
    """`-e name=value` for a playbook command's extra, shell-quoted once; `-e '{"name": "value"}'` when Ansible's
    k=v parsing would cut or change the value (a space: `-e 'f=/b k/x'` sets f to /b; a quote, a backslash)."""
    if _KV_SAFE.fullmatch(str(value)):
        return "-e " + shlex.quote("%s=%s" % (name, value))
    return "-e " + shlex.quote(json.dumps({name: value}))


def playbook_command(playbook, limit=None, extra="", carry=True, without=()):
    """`ansible-playbook playbooks/<playbook>.yml <the run's options> <extra>`, shell-quoted.

    extra is written as on a command line (`-e rollback_to=0009`, extra_var for a value that needs
    quoting); it wins over the run's -e of the same variable. carry=False words a command for
    another environment than this run's (`-l staging` from a production run): only `-l limit`.
    without names the run's `-e` variables the command must not carry; as a dict, with the values that
    are restated when an -e the command carries may still set one (`-e @vars.yml`, `-e '{"k": 1}'`).
    """
    extra_tokens = shlex.split(extra) if extra else []
    options = _RUN["options"] if carry else None
    if options is None:
        options = ["-l", limit or "<limit>"]
    elif "-l" not in options and limit:
        options = ["-l", limit] + list(options)
    extra_keys = _extra_keys(extra_tokens)
    options = _without(options, extra_keys | set(without))
    if isinstance(without, dict) and _may_set(options, without):
        # An -e this can't read through (a file, inline JSON or YAML, several pairs in one) may set one of them:
        # restated after it with the value that chooses nothing (of two -e, the later one wins).
        for key, value in without.items():
            if key not in extra_keys:
                options = options + ["-e", "%s=%s" % (key, value)]
    return " ".join(_quote(t) for t in ["ansible-playbook", "playbooks/%s.yml" % playbook] + options + extra_tokens)


def _may_set(options, keys):
    """Whether one of the run's -e values may still set one of ``keys``: a file (@path), or a value naming one."""
    names = re.compile(r"(?<![A-Za-z0-9_])(%s)(?![A-Za-z0-9_])" % "|".join(re.escape(k) for k in keys))
    return any(tok in ("-e", "--extra-vars") and i + 1 < len(options)
               and (options[i + 1].startswith("@") or names.search(options[i + 1]))
               for i, tok in enumerate(options))


def cleanup_command(limit, extra):
    """The rollback playbook as a cleanup only: `extra` (its -e rollback_drop_leftovers / rollback_drop_kept /
    rollback_allow_connections) and the run's options without the run's own choices of the rollback playbook.

    Said by a restore (-e rollback_mode=restore) or by a revert's precheck (-e rollback_to=...), a command
    carrying those would restore or revert again; carrying the run's other cleanup flags, it would drop more
    than it names.
    """
    return playbook_command("rollback", limit, extra, without=_ROLLBACK_CHOICES)


def psql_command(host, port, user, dbname, statement):
    """`psql -h H -p P -U U -d D -c STATEMENT`, shell-quoted: names only, never a URL or a password."""
    argv = ("psql", "-h", host, "-p", port, "-U", user, "-d", dbname, "-c", statement)
    return " ".join(shlex.quote(str(t)) for t in argv)


def _quote(token):
    """shlex.quote, except for a placeholder the operator replaces (`<limit>`, `VERSION|base`)."""
    if PLACEHOLDER.fullmatch(token):
        return token
    return shlex.quote(token)


class PlaybookAdvice(Advice):
    """Advice as `ansible-playbook playbooks/<stage>.yml ...` commands that can be pasted."""

    def __init__(self, limit=None):
        self.limit = limit or "<limit>"

    def _playbook(self, name, extra=""):
        return playbook_command(name, self.limit, extra)

    def migrate(self):
        return self._playbook("migrate")

    def rollback(self, extra):
        return self._playbook("rollback", extra)

    def accept_checksum(self, version):
        return self._playbook("accept_checksum", "-e migrate_accept_version=%s" % version)

    def status(self):
        return self._playbook("status")
