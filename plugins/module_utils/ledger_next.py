# -*- coding: utf-8 -*-
"""The next command an operator runs, worded as this collection's playbooks spell it.

The engine's core says *what* comes next (run the migrate stage again, revert to a
version, accept a checksum, show the status) through an Advice object; this is the
module layer's wording of it, for one inventory limit. Modules pass
PlaybookAdvice(limit) to the engine; the core never names a playbook itself.
"""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.module_utils.ledger_records import Advice


class PlaybookAdvice(Advice):
    """Advice as `ansible-playbook playbooks/<stage>.yml -l <limit> ...` commands that can be pasted."""

    def __init__(self, limit=None):
        self.limit = limit or "<limit>"

    def _playbook(self, name, extra=""):
        return "ansible-playbook playbooks/%s.yml -l %s%s" % (name, self.limit, (" " + extra) if extra else "")

    def migrate(self):
        return self._playbook("migrate")

    def rollback(self, extra):
        return self._playbook("rollback", extra)

    def accept_checksum(self, version):
        return self._playbook("accept_checksum", "-e migrate_accept_version=%s" % version)

    def status(self):
        return self._playbook("status")
