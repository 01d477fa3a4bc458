"""`cache sink_window(sinks, window)`: StreamingLLM (Xiao et al., arXiv:2309.17453; algorithms.md §12.3).

Every layer keeps the first `sinks` tokens (attention sinks) and the most recent ones, so that each
query attends to at most `sinks + window` tokens, itself included (StreamingLLM's `evict_for_space`
before each token; the prompt itself is processed whole).

Positions follow StreamingLLM's pos-shift: once a layer has evicted, its cached keys are re-rotated
to their index in the cache (0..n-1 over real tokens) and each new token takes the next index; before
the first eviction tokens keep the positions prefill gave them.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import CacheOp, Slots, first, last, register_cache

from policyc.catalog.base import Option, Spec
from policyc.catalog.caches import DECODE


@register_cache
class SinkWindow(CacheOp):
    spec = Spec(
        "sink_window", "cache", "keep the first `sinks` tokens and the last `window` tokens (StreamingLLM)",
        options=(Option("sinks", ("count",), "attention-sink tokens", default="4", integer=True),
                 Option("window", ("count",), "recent tokens", default="2000", integer=True)),
        stages=DECODE, paper="StreamingLLM arXiv:2309.17453")
    every_step = True
    relative_positions = True

    def validate(self) -> None:
        if self.number("window") < 1:
            raise self.error("sink_window needs window >= 1: the window holds the current token",
                             "use window=1 or more")

    def keep(self, slots: Slots) -> torch.Tensor:
        sinks, recent = self.budget("sinks", slots), self.budget("window", slots) - 1  # the next token comes in
        candidates = slots.candidates
        over = candidates.sum(-1, keepdim=True) > (sinks + recent)[:, None, None]
        kept = first(candidates, sinks) | last(candidates, recent)
        return torch.where(over, kept, torch.ones_like(kept))
