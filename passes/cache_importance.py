"""`cache importance(mass, every)`: ZipVL v2's decode-time eviction (He et al., arXiv:2410.08584; algorithms.md
§12.4 step 7). There is no public code; this is our reading of the paper's description.

The prompt's cache is what prefill left (ZipVL's prefill selection is the policy's `llm.layer[...]` stage).
Every `every` generated tokens, each layer recompresses the last `every` entries, the generated tokens cached
since the previous recompression: the newest query (the token that completes the window) scores them by its
attention softmax(q . K[-every:]ᵀ * scale), the softmax over those entries only, per query head, then the mean
over all query heads; the entries holding `mass` of that attention stay (at least one; ties to the earlier
token; passes/schedule_mass.py) and the others are evicted. The decision is per token, the same in every key/value head
(ZipVL's sparsity is token-level). Tokens keep their original positions.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import CacheOp, Slots, register_cache
from policyc.passes.schedule_mass import mass_keep

from policyc.catalog.base import Option, Spec
from policyc.catalog.caches import DECODE


@register_cache
class Importance(CacheOp):
    spec = Spec(
        "importance", "cache", "every `every` generated tokens, keep of the last `every` cache entries those "
        "holding `mass` of the newest query's attention over them and evict the rest (ZipVL v2)",
        options=(Option("mass", ("number",), "attention mass kept", default="0.975", low=0, high=1),
                 Option("every", ("number",), "generated tokens between recompressions", default="100", low=1,
                        integer=True)),
        stages=DECODE, paper="ZipVL arXiv:2410.08584")
    scores = "newest"
    every_step = True

    def keep(self, slots: Slots) -> torch.Tensor:
        """Branch-free over decode steps (no host sync: static caches decode in one compiled graph): the window is
        scored at every step, and kept whole except at the steps that complete one."""
        every = int(self.number("every"))
        keep = torch.ones_like(slots.real)
        if slots.after_prefill:
            return keep
        if slots.newest is None:
            raise self.error("cache importance needs the newest query's attention, which was not observed")
        newest = slots.positions.amax()  # the token just cached
        window = slots.positions[:, 0] > newest - every  # [B, n] the last `every` entries (every head holds them)
        logits = slots.newest.masked_fill(~window[:, None], float("-inf"))  # [B, H, n]
        attention = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(1)  # [B, n]
        kept = mass_keep(attention, window, self.number("mass"), self.statement.span, validate=False)
        due = (torch.as_tensor(slots.generated) > 0) & (torch.as_tensor(slots.generated) % every == 0)
        return (kept | ~window | ~due)[:, None, :].expand_as(keep)
