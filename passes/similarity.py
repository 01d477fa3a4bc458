"""`similarity(SET, features=hidden, reduce=mean|max)`: each token's cosine similarity to the tokens of SET, reduced
over SET by its mean or max (MustDrop's and SparseVLM's relevance to raters; EfficientVLA arXiv:2506.10100 Eq. 5
ranks by 1 - max_{k in V_key} cos(v_j, v_k)).

cos(x_i, x_k) = x_i . x_k / (max(||x_i||, 1e-12) max(||x_k||, 1e-12)) over the current rows' features, in float32;
`reduce=mean` averages over SET's tokens, `reduce=max` takes the largest. A token of SET is compared with itself
too (similarity 1). 0 where SET holds no token alive in the sample. [B, L'] -> [B, L] over original positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
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
        to = call.args[0] if call.args else self.option(call, "to", ctx)
        if to is None:
            raise PolicyError.at("similarity() needs the set to compare with, e.g. similarity(key)", call.span)
        features = self.option(call, "features", ctx) or ir.Name(id="hidden", span=call.span)
        reduce = self.option(call, "reduce", ctx)
        unit = torch.nn.functional.normalize(ctx.features(features).float(), dim=-1)  # [B, L', C]
        target = ctx.set(to).gather(1, ctx.state.kept)  # [B, L'] the current rows in SET
        live = ctx.state.live()
        if live is not None:
            target = target & live
        cosine = unit @ unit.transpose(1, 2)  # [B, L', L']
        count = target.sum(1, keepdim=True)  # [B, 1]
        if isinstance(reduce, ir.Name) and reduce.id == "max":
            values = cosine.masked_fill(~target[:, None, :], float("-inf")).amax(-1)
        else:
            values = (cosine * target[:, None, :]).sum(-1) / count.clamp(min=1)
        return scatter_scores(torch.where(count > 0, values, torch.zeros_like(values)), ctx)
