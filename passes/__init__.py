"""Runtime operators, one per file, registered by the names the language's catalog uses.

Shipped as `policyc.passes`. Importing this package registers every operator in it.
"""

from policyc.passes import attention, key_norm, random_score  # noqa: F401  (registration)
from policyc.passes.base import SIGNAL_OPS, SignalOp, register_signal

__all__ = ["SIGNAL_OPS", "SignalOp", "register_signal"]
