"""Cache policies: `cache METHOD(options)` in the `decode` stage decides what the KV cache keeps.

Each cache policy (`passes/cache_full.py`, ...) declares its spec beside its code and registers it here."""

from policyc.catalog.base import Registry, StageKind

DECODE: frozenset[StageKind] = frozenset({"decode"})
CACHES = Registry("cache", "cache policy", operators=True)
