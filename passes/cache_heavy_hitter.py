"""`cache heavy_hitter(heavy, recent, per_head)`: H2O (Zhang et al., arXiv:2306.14048; algorithms.md §12.1).

Each slot accumulates the attention it receives: column sums over every prompt query in prefill,
then the new query's attention at each decode step. Whenever a layer holds more than
`heavy + recent` candidate tokens, it keeps the `recent` newest plus the `heavy` highest-scoring
older ones and evicts the rest, so each query sees at most `heavy + recent + 1` tokens.

Percentages are of the real prompt tokens the layer cached in prefill. With grouped-query attention
a decision is made per key/value head, on the attention its query heads pay summed over the group
(keys and values are what is cached, once per key/value head); `per_head=false` makes one decision
per layer from the sum over all heads. Tokens keep their original positions.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import CacheOp, Slots, last, register_cache, top

from policyc.catalog.base import Option, Spec
from policyc.catalog.caches import DECODE


@register_cache
class HeavyHitter(CacheOp):
    spec = Spec(
        "heavy_hitter", "cache", "keep the tokens with the most accumulated attention plus a recent window, "
        "per head (H2O)",
        options=(Option("heavy", ("count", "percent"), "heavy-hitter budget", default="10%"),
                 Option("recent", ("count", "percent"), "recent-window budget", default="10%"),
                 Option("per_head", ("enum",), "select per head", default="true", choices=("true", "false"))),
        stages=DECODE, paper="H2O arXiv:2306.14048")
    scores = "accumulated"
    every_step = True

    def keep(self, slots: Slots) -> torch.Tensor:
        assert slots.scores is not None  # the machinery accumulates them for `scores = "accumulated"`
        heavy, recent = self.budget("heavy", slots), self.budget("recent", slots)
        candidates = slots.candidates
        over = candidates.sum(-1, keepdim=True) > (heavy + recent)[:, None, None]
        newest = last(candidates, recent)
        scores = slots.scores if self.word("per_head") == "true" else slots.scores.sum(1, keepdim=True).expand_as(
            slots.scores)
        kept = newest | top(candidates & ~newest, scores, heavy)
        return torch.where(over, kept, torch.ones_like(kept))

    def most_held(self, slots: Slots) -> torch.Tensor:
        """Candidates never outnumber `heavy + recent` after an eviction, and other slots (protected, padding) never
        grow: the held non-candidates plus the budget."""
        others = ((slots.positions >= 0) & ~slots.candidates).sum(-1)
        return others + (self.budget("heavy", slots) + self.budget("recent", slots))[:, None]
