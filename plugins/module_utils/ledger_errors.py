# -*- coding: utf-8 -*-
"""LedgerError: an operator-facing failure, the one exception every ledger module raises and reports."""

from __future__ import annotations


class LedgerError(Exception):
    """An operator-facing failure: a message plus structured fields for the result."""

    def __init__(self, msg, **fields):
        super(LedgerError, self).__init__(msg)
        self.msg = msg
        self.fields = fields
