"""`cache regather`: MustDrop's output-aware cache (arXiv:2411.10803; algorithms.md §4.3).

After prefill, every layer from the first prefill stage on keeps only the prompt tokens that
survive the LAST prefill stage (a layer that cached tokens a later stage dropped forgets them);
layers before the first stage keep their full cache, as MustDrop's code does. Nothing is evicted
during decoding.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import CacheOp, Slots, register_cache

from policyc.catalog.base import Spec
from policyc.catalog.caches import DECODE


@register_cache
class Regather(CacheOp):
    spec = Spec(
        "regather", "cache", "after prefill, shrink every pruned layer's cache to the tokens that survive the "
        "last stage (MustDrop's output-aware cache)", stages=DECODE, paper="MustDrop arXiv:2411.10803")
    all_layers = False

    def keep(self, slots: Slots) -> torch.Tensor:
        return slots.survives
