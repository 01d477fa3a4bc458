"""`cache coactivation(reference, first, last)`: CoreMatching's core tokens (Wang et al., ICML'25, arXiv:2505.19235;
algorithms-more.md §5), as the authors' code applies them: a decode-time KV-cache eviction.

In prefill (unchanged), each affected layer's MLP records, per sample, which intermediate neurons fire
(`act_fn(gate_proj(x)) * up_proj(x) > 0`, [L', m]) and scores each image token by how many neurons it shares
with one reference token of the prompt (`reference`: its index among the real prompt rows the layer processed,
negative from the end, -1 the last; the code's hard-coded row L-5 is `reference=-5` under llava-hf's template).
After a prefill stage dropped tokens, a later layer ranks the image tokens it still holds. After prefill, per
sample and layer, the image tokens' scores are sorted descending; the elbow is the sorted point farthest from
the chord joining the first and the last; the core tokens score strictly above the elbow's score (all of them
when every score is equal). The layer's cache drops the other image tokens; text tokens all stay.

Exact eviction, not the code's soft edit (K and V set to 0, which still take exp(0) of the softmax mass and
dilute every decode step's attention): the paper's stated intent is to keep only core tokens in the cache.
`first`, `last`: the inclusive range of decoder layers it evicts in (negative indices count from the end); `scaled`
(the default) is the code's layers 5..18 of LLaVA-1.5-7B's 32 scaled to the model's depth, rounded down (5..18 on
32 layers, 1..4 on 8). Other layers keep their whole cache.
"""

from __future__ import annotations

import torch
from policyc.passes.cache_base import CacheOp, Slots, register_cache

from policyc.catalog.base import Option, Spec
from policyc.catalog.caches import DECODE
from policyc.lang import ir

NOT_IMAGE = -1.0  # the score of rows that are not image tokens (co-activation counts are >= 0)
CODE_LAYERS, CODE_DEPTH = (5, 18), 32  # the code's layers, on LLaVA-1.5-7B's 32


def elbow_core(scores: torch.Tensor) -> torch.Tensor:
    """[n] co-activation counts -> [n] bool, the core tokens: strictly above the sorted scores' elbow (the point
    farthest from the chord joining the first and last sorted scores; the first such point on ties)."""
    ordered = scores.double().sort(descending=True).values
    count = ordered.shape[0]
    if count < 2 or bool(ordered[0] == ordered[-1]):
        return torch.ones_like(scores, dtype=torch.bool)
    steps = torch.arange(count, dtype=torch.float64, device=scores.device)
    rise, run = ordered[-1] - ordered[0], float(count - 1)
    distance = (rise * steps - run * (ordered - ordered[0])).abs() / torch.sqrt(rise * rise + run * run)
    return scores.double() > ordered[int(distance.argmax())]


@register_cache
class Coactivation(CacheOp):
    spec = Spec("coactivation", "cache", "after prefill, keep in each affected layer's cache only the image tokens "
                "whose MLP neurons co-activate most with a reference token, cut at the elbow (CoreMatching)",
                options=(Option("reference", ("number",), "the reference token: its index among the real prompt "
                                "rows the layer processed, negative from the end", default="-1", integer=True),
                         Option("first", ("number", "enum"), "the first decoder layer it evicts in (negative from "
                                "the end), or `scaled`: the code's 5 of 32 scaled to the depth", default="scaled",
                                choices=("scaled",)),
                         Option("last", ("number", "enum"), "the last decoder layer it evicts in (inclusive), or "
                                "`scaled`: the code's 18 of 32 scaled to the depth", default="scaled",
                                choices=("scaled",))),
                stages=DECODE, paper="CoreMatching arXiv:2505.19235")
    scores = "coactivation"

    def validate(self) -> None:
        self.number("reference")
        for name in ("first", "last"):
            value = self.options[name]
            if isinstance(value, ir.Number) and not isinstance(value.value, int):
                raise self.error(f"coactivation's {name} must be a whole layer index, got {value.value:g}",
                                 f"e.g. {name}=5, or {name}=scaled")

    def affected_layers(self, depth: int) -> list[int]:
        """The decoder layers whose cache this operator evicts in, on a `depth`-layer LLM (empty: a PolicyError)."""
        bounds = []
        for name, code in zip(("first", "last"), CODE_LAYERS, strict=True):
            value = self.options[name]
            layer = int(value.value) if isinstance(value, ir.Number) else code * depth // CODE_DEPTH
            bounds.append(layer + depth if layer < 0 else layer)
        chosen = [k for k in range(bounds[0], bounds[1] + 1) if 0 <= k < depth]
        if not chosen:
            raise self.error(f"coactivation's layers {bounds[0]}..{bounds[1]} name no layer of this {depth}-layer "
                             "LLM", f"write first and last within 0..{depth - 1}, or leave them `scaled`")
        return chosen

    def reference_row(self, real: torch.Tensor) -> int:
        """The reference's row among a sample's rows, given which are real ([L'] bool)."""
        rows = real.nonzero().squeeze(1)
        index = int(self.number("reference"))
        if not -rows.shape[0] <= index < rows.shape[0]:
            raise self.error(f"coactivation's reference={index} is outside a prompt of {rows.shape[0]} tokens",
                             "-1 is the prompt's last token")
        return int(rows[index])

    def keep(self, slots: Slots) -> torch.Tensor:
        keep = torch.ones_like(slots.real)
        if slots.scores is None or not slots.after_prefill:  # a layer it leaves alone, or a decode step
            return keep
        for b in range(keep.shape[0]):  # right after prefill every key/value head holds the same tokens
            image = (slots.scores[b, 0] > NOT_IMAGE) & slots.real[b, 0]  # protected ones too: they stay anyway
            if bool(image.any()):
                keep[b, :, image] = elbow_core(slots.scores[b, 0, image])
        return keep
