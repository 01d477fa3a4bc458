"""`cache mixed_precision(mass, high_bits, low_bits, every)`: ZipVL v1's mixed-precision KV cache (He et al.,
arXiv:2410.08584 v1; algorithms.md §12.4 step 6: K = cat(Quant(K[T], b_h), Quant(K[U], b_l)), same for V).
There is no public code; this is our reading of the paper's description.

The important set T is chosen as ZipVL chooses the tokens it keeps (the rule of `cache importance`, ZipVL v2),
and every other token U is stored in fewer bits instead of being evicted:
- right after prefill, each layer ranks every real prompt token by ZipVL's normalized attention score (Eq. 7):
  the attention every real prompt row pays it (softmax over the keys the row sees, summed over all query
  heads), summed over the rows, divided by the number of real prompt rows that see it; T is the fewest tokens
  holding `mass` of that score (Eq. 6, passes/schedule_mass.py), plus protected tokens; each layer has its own T;
- every `every` generated tokens, the last `every` cache entries (the tokens generated since the previous
  recompression, held in full precision until then) are scored by the newest query's attention over them
  (softmax per query head, mean over the heads) and T is the entries holding `mass` of it.
T is quantized to `high_bits`, U to `low_bits` (defaults 4 and 2, ZipCache's widths [our reading: ZipVL says
only "high-bit" and "low-bit"]). The decision is per token, the same in every key/value head. The quantizer
(per token, groups of 32 channels, asymmetric min-max) is policyc/runtime/cache_quantized.py's. Tokens keep
their original positions; `mass=1` stores every token in `high_bits`; `high_bits == low_bits` is a uniform
b-bit cache whatever `mass` is.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import QuantizingCacheOp, Slots, register_cache
from policyc.passes.schedule_mass import mass_keep

from policyc.catalog.base import Option, Spec
from policyc.catalog.caches import DECODE


@register_cache
class MixedPrecision(QuantizingCacheOp):
    spec = Spec(
        "mixed_precision", "cache", "keep the tokens holding `mass` of the attention in high precision and the "
        "rest in low precision, recompressing every `every` steps (ZipVL v1)",
        options=(Option("mass", ("number",), "attention mass of the important set", default="0.975", low=0, high=1),
                 Option("high_bits", ("number",), "bits for important tokens", default="4", low=1, high=16,
                        integer=True),
                 Option("low_bits", ("number",), "bits for the rest", default="2", low=1, high=16, integer=True),
                 Option("every", ("number",), "decode steps between recompressions", default="100", low=1,
                        integer=True)),
        stages=DECODE, paper="ZipVL arXiv:2410.08584")
    scores = "normalized"
    every_step = True

    def validate(self) -> None:
        high, low = self.bits("high_bits"), self.bits("low_bits")
        if high < low:
            raise self.error(f"cache mixed_precision stores the important tokens in high_bits={high} bits, fewer "
                             f"than the rest's low_bits={low}", f"swap them: high_bits={low}, low_bits={high}")

    def widths(self, slots: Slots) -> torch.Tensor:
        mass, every = self.number("mass"), int(self.number("every"))
        if slots.after_prefill:
            if slots.scores is None:
                raise self.error("cache mixed_precision needs the prompt's attention, which was not observed")
            chosen = slots.real[:, 0]  # [B, n]: right after prefill every key/value head holds the same tokens
            score = slots.scores.sum(1)  # [B, n] summed over the key/value heads (each sums its query heads)
            important = mass_keep(score, slots.candidates[:, 0], mass, self.statement.span) | slots.protected[:, 0]
        elif slots.generated and slots.generated % every == 0:
            if slots.newest is None:
                raise self.error("cache mixed_precision needs the newest query's attention, which was not observed")
            newest = int(slots.positions.max())  # the token just cached
            chosen = slots.positions[:, 0] > newest - every  # [B, n] the last `every` entries
            logits = slots.newest.masked_fill(~chosen[:, None], float("-inf"))  # [B, H, n]
            attention = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(1)  # [B, n]
            important = mass_keep(attention, chosen, mass, self.statement.span)
        else:
            return torch.zeros_like(slots.positions)
        widths = torch.where(important, self.bits("high_bits"), self.bits("low_bits")).masked_fill(~chosen, 0)
        return widths[:, None, :].expand_as(slots.positions)
