# -*- coding: utf-8 -*-
"""Action plugin for the ledger_migrate module: in-process on the controller's own Python, else the module.

See plugins/action/ledger_inprocess.py for when and how the module runs in the worker process.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _base():
    name = "ansible_ledger_inprocess"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ledger_inprocess.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


class ActionModule(_base().LedgerAction):

    MODULE = "ledger_migrate"
