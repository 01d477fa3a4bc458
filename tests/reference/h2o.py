"""H2O as its real-drop code does it (Zhang et al., arXiv:2306.14048; FMInference/H2O
`utils_real_drop/modify_llama.py::H2OKVCache_LayerWise`); shares no code with policyc.

Every slot accumulates the attention probabilities it receives (all prefill rows, then each decode
query), per head; with grouped-query attention, per key/value head, summed over its query heads.
After prefill and after every step, a layer holding more than `heavy + recent` tokens keeps the last
`recent` slots plus the `heavy` highest-scoring older ones (ties to the earlier slot), in order.
Budgets: an int is a count; a float f is `floor(f * n)`, n the prompt tokens the layer cached.
With `per_head=False` one choice per layer, from the scores summed over heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.cache_loop import LayerCache, cache_generate
from reference.fastv import eager_copy


def _budget(amount: int | float, size: int) -> int:
    return amount if isinstance(amount, int) else int(amount * size)


class H2O:
    relative = False

    def __init__(self, heavy: int | float, recent: int | float, per_head: bool = True) -> None:
        self.heavy, self.recent, self.per_head = heavy, recent, per_head

    def keep(self, layer: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> Tensor:
        heavy, recent = _budget(self.heavy, cache.prompt_size), _budget(self.recent, cache.prompt_size)
        heads, size = cache.tokens.shape
        keep = torch.ones(heads, size, dtype=torch.bool)
        if size <= heavy + recent:
            return keep
        score = cache.score if self.per_head else cache.score.sum(0, keepdim=True).expand(heads, -1)
        keep[:, : size - recent] = False
        for head in range(heads):
            older = score[head, : size - recent]
            chosen = torch.sort(older, descending=True, stable=True).indices[:heavy]
            keep[head, chosen] = True
        return keep


def h2o_generate(model, input_ids, attention_mask, pixel_values, *, heavy, recent,  # type: ignore[no-untyped-def]
                 per_head=True, max_new_tokens):
    return cache_generate(eager_copy(model), input_ids, attention_mask, pixel_values,
                          lambda: H2O(heavy, recent, per_head), max_new_tokens)
