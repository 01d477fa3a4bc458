"""`cache snapkv(window, capacity, kernel, pool)`: SnapKV (Li et al., arXiv:2404.14469; algorithms.md §12.2).

Once, after prefill: the last `window` prompt queries of each layer vote (their attention
probabilities, summed over the window's queries and, with grouped-query attention, over the query
heads of each key/value head); the votes of the older tokens are pooled over `kernel` neighbours
(max or avg, stride 1, padding kernel // 2, over the layer's cached tokens in order) and each
key/value head keeps its top `capacity - window` older tokens plus the window. A layer holding at
most `capacity` real tokens is left as it is. Tokens keep their original positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from policyc.passes.cache_base import CacheOp, Slots, last, register_cache, top

from policyc.catalog.base import Option, Spec
from policyc.catalog.caches import DECODE


@register_cache
class SnapKV(CacheOp):
    spec = Spec(
        "snapkv", "cache", "vote with the last `window` prompt queries, pool the votes, keep the top "
        "`capacity` tokens per head (SnapKV)",
        options=(Option("window", ("count",), "observation window", default="32", integer=True),
                 Option("capacity", ("count",), "tokens kept per head, window included", default="2048",
                        integer=True),
                 Option("kernel", ("number",), "pooling kernel", default="7", low=1, integer=True),
                 Option("pool", ("enum",), "pooling", default="max", choices=("max", "avg"))),
        stages=DECODE, paper="SnapKV arXiv:2404.14469")
    scores = "window"

    def validate(self) -> None:
        window, capacity = self.number("window"), self.number("capacity")
        if window < 1 or capacity <= window:
            raise self.error(f"snapkv needs 1 <= window < capacity, got window={window:g} and capacity={capacity:g}",
                             "the capacity counts the observation window: make it larger than the window")

    def keep(self, slots: Slots) -> torch.Tensor:
        assert slots.scores is not None  # the machinery records the window votes for `scores = "window"`
        window, capacity = self.budget("window", slots), self.budget("capacity", slots)
        candidates = slots.candidates
        observed = last(candidates, window)
        older = candidates & ~observed
        pooled = torch.zeros_like(slots.scores, dtype=torch.float32)
        kernel = int(self.number("kernel"))
        pool = F.max_pool1d if self.word("pool") == "max" else F.avg_pool1d
        for row in range(pooled.shape[0]):  # each sample pools over its own older tokens, in order
            columns = older[row, 0].nonzero().squeeze(1)  # after prefill every head holds the same tokens
            if columns.numel() == 0:
                continue
            votes = slots.scores[row][:, columns].float()
            pooled[row][:, columns] = pool(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0, :len(columns)]
        over = candidates.sum(-1, keepdim=True) > capacity[:, None, None]
        kept = observed | top(older, pooled, capacity - window)
        return torch.where(over, kept, torch.ones_like(kept))
