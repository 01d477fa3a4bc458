"""StreamingLLM (Xiao et al., arXiv:2309.17453; mit-han-lab/streaming-llm `StartRecentKVCache` and
`pos_shift/modify_llama.py`); shares no code with policyc.

The prompt is processed whole. Before each new token, a layer holding more than `sinks + window - 1`
tokens keeps the first `sinks` and the last `window - 1` (`evict_for_space(1)`), so each query sees at
most `sinks + window` tokens, itself included. Keys are cached un-rotated and rotated at every step at
their index in the cache; the query sits at the next index (pos-shift).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.cache_loop import LayerCache, cache_generate
from reference.fastv import eager_copy


class SinkWindow:
    relative = True

    def __init__(self, sinks: int, window: int) -> None:
        self.sinks, self.window = sinks, window

    def keep(self, layer: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> Tensor:
        heads, size = cache.tokens.shape
        keep = torch.ones(heads, size, dtype=torch.bool)
        if size > self.sinks + self.window - 1:
            keep[:, self.sinks : size - (self.window - 1)] = False
        return keep


def streaming_generate(model, input_ids, attention_mask, pixel_values, *, sinks, window,  # type: ignore[no-untyped-def]
                       max_new_tokens):
    return cache_generate(eager_copy(model), input_ids, attention_mask, pixel_values,
                          lambda: SinkWindow(sinks, window), max_new_tokens)
