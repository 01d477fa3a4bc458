"""MustDrop's output-aware cache (arXiv:2411.10803; algorithms.md §4.3), after FastV-style prefill
stages; shares no code with policyc.

Prefill stages after decoder layers k1 < k2 < ... keep the top image tokens by the last prompt
token's attention (mean over heads); each layer caches the rows it processed. After prefill, every
layer from k1 on keeps only the prompt tokens that survive the LAST stage (layers before k1 keep
everything, as MustDrop's code does). Tokens keep their original positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.cache_loop import LayerCache, Stage, cache_generate
from reference.fastv import eager_copy


class Regather:
    relative = False

    def __init__(self, first_stage_layer: int) -> None:
        self.first = first_stage_layer

    def keep(self, layer: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> Tensor:
        if not after_prefill or layer < self.first:
            return torch.ones_like(cache.tokens, dtype=torch.bool)
        return torch.isin(cache.tokens, final)


def regather_generate(model, input_ids, attention_mask, pixel_values, *, stages: list[Stage],  # type: ignore[no-untyped-def]
                      max_new_tokens):
    first = min(s.layer for s in stages)
    return cache_generate(eager_copy(model), input_ids, attention_mask, pixel_values, lambda: Regather(first),
                          max_new_tokens, stages)
