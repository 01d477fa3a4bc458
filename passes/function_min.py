"""`min(x)`: the minimum of a score over the image tokens alive, one value per row (an image before the LLM,
a prompt in it)."""

from __future__ import annotations

import torch
from policyc.passes.functions import ReductionFunction, register_function


@register_function
class Min(ReductionFunction):
    spec = ReductionFunction.reduction_spec("min", "minimum of a score over the image tokens alive")

    def reduce(self, values: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
        return values.masked_fill(~over, float("inf")).amin(1, keepdim=True)
