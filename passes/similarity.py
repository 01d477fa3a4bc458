"""`similarity(SET, features=hidden, reduce=mean)`: each token's cosine similarity to the tokens of a set, reduced
over that set by its mean or max (MustDrop's and SparseVLM's relevance to raters). A token whose row has no member
of the set alive scores 0. Features [B, L', C] -> [B, L] float over original positions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class Similarity(SignalOp):
    spec = Spec(
        "similarity", "signal", "cosine similarity of each token to a token set, reduced over that set",
        options=(Option("to", ("set",), "the set compared against", positional=True),
                 Option("features", ("feature",), "features compared", default="hidden"),
                 Option("reduce", ("enum",), "reduce over the set", default="mean", choices=("mean", "max"))))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        target = call.args[0] if call.args else self.option(call, "to", ctx)
        features = self.option(call, "features", ctx) or ir.Name(id="hidden", span=call.span)
        reduce = self.option(call, "reduce", ctx)
        unit = torch.nn.functional.normalize(ctx.features(features).float(), dim=-1)  # [B, L', C]
        members = ctx.set(target).gather(1, ctx.state.kept)  # [B, L'] rows in the set
        similarity = unit @ unit.transpose(1, 2)  # [B, L', L']
        if isinstance(reduce, ir.Name) and reduce.id == "max":
            best = similarity.masked_fill(~members[:, None, :], float("-inf")).amax(-1)
            values = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        else:
            values = (similarity * members[:, None, :]).sum(-1) / members.sum(-1, keepdim=True).clamp(min=1)
        return scatter_scores(values, ctx)
