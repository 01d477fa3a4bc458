"""`softmax(x, temperature=1)`: a score turned into probabilities over the image tokens alive,
exp(x / t) / sum over them of exp(x / t) (other tokens get the same formula's value, outside the sum)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.functions import ScoreFunction, register_function

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_function
class Softmax(ScoreFunction):
    spec = Spec("softmax", "function", "softmax of a score over the stage's image tokens",
                options=(Option("x", ("score",), "per-token score", positional=True),
                         Option("temperature", ("number",), "temperature", default="1", low=0)),
                returns="score")

    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        logits = ctx.score(call.args[0]).double() / self.number(call, "temperature", ctx)
        over = ctx.builtin("vision")  # the image tokens alive
        top = logits.masked_fill(~over, float("-inf")).amax(1, keepdim=True).nan_to_num(0.0, neginf=0.0)
        weights = (logits - top).exp()
        total = weights.masked_fill(~over, 0.0).sum(1, keepdim=True)
        return (weights / total).float()
