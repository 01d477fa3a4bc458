"""`diversity(features=hidden)`: each token's cosine distance to its nearest neighbour among the image tokens
alive at the stage (in one image, before the LLM; in one prompt, in the LLM), DivPrune's isolation (arXiv:2503.02175).
A token with no other image token alive scores 1 (nothing like it). [B, L'] -> [B, L] float."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class Diversity(SignalOp):
    spec = Spec(
        "diversity", "signal", "cosine distance of each token to its nearest neighbour among the image tokens "
        "alive at the stage (one image before the LLM)",
        options=(Option("features", ("feature",), "features compared", default="hidden"),),
        paper="DivPrune arXiv:2503.02175")

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        features = self.option(call, "features", ctx) or ir.Name(id="hidden", span=call.span)
        unit = torch.nn.functional.normalize(ctx.features(features).float(), dim=-1)  # [B, L', C]
        state = ctx.state
        kept = state.kept
        member = (state.image & state.alive() & state.valid).gather(1, kept)  # [B, L']
        similarity = unit @ unit.transpose(1, 2)  # [B, L', L']
        others = member[:, None, :] & ~torch.eye(kept.shape[1], dtype=torch.bool, device=kept.device)[None]
        nearest = similarity.masked_fill(~others, float("-inf")).amax(-1)
        distance = torch.where(torch.isfinite(nearest), 1 - nearest, torch.ones_like(nearest))
        return scatter_scores(distance, ctx)
