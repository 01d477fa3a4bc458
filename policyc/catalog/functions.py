"""Functions usable in score, amount and set expressions (`normalize`, `size`, `dilate`, ...).

Each function (`passes/function_normalize.py`, ...) declares its spec beside its code and registers it here;
plug-ins add theirs the same way (policyc.operators)."""

from policyc.catalog.base import Registry

FUNCTIONS = Registry("function", "function", operators=True)
