"""`normalize(x, by=sum|max|minmax)`: a score rescaled over the image tokens alive (FlowCut, arXiv:2505.19536,
divides its scores by their sum over the patches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.functions import ScoreFunction, register_function

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_function
class Normalize(ScoreFunction):
    spec = Spec("normalize", "function", "rescale a score over the stage's image tokens: divide by its sum (or max, "
                "or min-max)",
                options=(Option("x", ("score",), "per-token score", positional=True),
                         Option("by", ("enum",), "normaliser", default="sum", choices=("sum", "max", "minmax"))),
                returns="score")

    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        x = ctx.score(call.args[0])
        inside = x.masked_fill(~ctx.builtin("vision"), float("nan"))
        by = self.word(call, "by", ctx)
        if by == "sum":
            return x / torch.nansum(inside, 1, keepdim=True)
        top = inside.nan_to_num(float("-inf")).amax(1, keepdim=True)
        if by == "max":
            return x / top
        low = inside.nan_to_num(float("inf")).amin(1, keepdim=True)
        return (x - low) / (top - low)
