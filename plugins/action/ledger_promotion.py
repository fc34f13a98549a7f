# -*- coding: utf-8 -*-
"""Action plugin for the ledger_promotion module: in-process on the controller's own Python, else the module.

See plugins/plugin_utils/ledger_inprocess.py for when and how the module runs in the worker process.
"""

from __future__ import annotations

from ansible_collections.arrakis.ledger.plugins.plugin_utils.ledger_inprocess import LedgerAction


class ActionModule(LedgerAction):

    MODULE = "ledger_promotion"
