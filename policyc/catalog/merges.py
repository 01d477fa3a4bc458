"""Merges: `merge METHOD(options) of SET [into SET] [by FEATURES]` folds tokens into others.

Each merge (`passes/merge_bipartite.py`, ...) declares its spec beside its code and registers it here."""

from policyc.catalog.base import Registry

MERGES = Registry("merge", "merge method", operators=True)
