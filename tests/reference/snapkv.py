"""SnapKV (Li et al., arXiv:2404.14469; FasterDecoding/SnapKV `SnapKVCluster.update_kv`); shares no
code with policyc.

Once, after prefill, per layer holding more than `capacity` tokens: the last `window` prompt rows'
attention probabilities over the older tokens are summed over those rows (and, with grouped-query
attention, over the query heads of each key/value head), pooled with `kernel` (max or avg, stride 1,
padding kernel // 2), and each key/value head keeps its top `capacity - window` older tokens (ties to
the earlier one) plus the window. Nothing is evicted while decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.cache_loop import LayerCache, cache_generate
from reference.fastv import eager_copy


class SnapKV:
    relative = False

    def __init__(self, window: int, capacity: int, kernel: int, pool: str) -> None:
        self.window, self.capacity, self.kernel, self.pool = window, capacity, kernel, pool

    def keep(self, layer: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> Tensor:
        heads, size = cache.tokens.shape
        keep = torch.ones(heads, size, dtype=torch.bool)
        if not after_prefill or size <= self.capacity:
            return keep
        assert cache.prefill_probs is not None
        probs = cache.prefill_probs  # [H, n, n]
        older = size - self.window
        votes = probs[:, older:, :older].sum(1)  # [H, older]
        votes = votes.view(heads, -1, older).sum(1)  # per key/value head
        pool = F.max_pool1d if self.pool == "max" else F.avg_pool1d
        pooled = pool(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0, :older]
        keep[:, :older] = False
        for head in range(heads):
            ranked = torch.sort(pooled[head], descending=True, stable=True).indices
            keep[head, ranked[: self.capacity - self.window]] = True
        return keep


def snapkv_generate(model, input_ids, attention_mask, pixel_values, *, window, capacity,  # type: ignore[no-untyped-def]
                    kernel=7, pool="max", max_new_tokens):
    return cache_generate(eager_copy(model), input_ids, attention_mask, pixel_values,
                          lambda: SnapKV(window, capacity, kernel, pool), max_new_tokens)
