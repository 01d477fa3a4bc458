"""`cache full`: keep every layer's cache as prefill left it (the default decode stage).

Every slot stays; the cache machinery (policyc/runtime/cache.py) therefore installs nothing for it.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import CacheOp, Slots, register_cache

from policyc.catalog.base import Spec
from policyc.catalog.caches import DECODE


@register_cache
class Full(CacheOp):
    spec = Spec("full", "cache", "keep every layer's cache as prefill left it (the default)", stages=DECODE)

    def keep(self, slots: Slots) -> torch.Tensor:
        return torch.ones_like(slots.real)
