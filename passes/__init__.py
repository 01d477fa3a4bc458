"""Runtime operators, one per file, registered by the names the language's catalog uses.

Shipped as `policyc.passes`. Importing this package registers every operator in it.
"""

from policyc.passes import (  # noqa: F401  (registration)  # noqa: F401
    attention,
    cache_heavy_hitter,
    cache_regather,
    cache_sink_window,
    cache_snapkv,
    key_norm,
    random_score,
)
from policyc.passes.base import SIGNAL_OPS, SignalOp, register_signal
from policyc.passes.cache_base import CACHE_OPS, CacheOp, register_cache

__all__ = ["CACHE_OPS", "SIGNAL_OPS", "CacheOp", "SignalOp", "register_cache", "register_signal"]
