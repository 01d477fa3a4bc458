"""`max(x)`: the maximum of a score over the image tokens alive, one value per row (an image before the LLM,
a prompt in it)."""

from __future__ import annotations

import torch
from policyc.passes.functions import ReductionFunction, register_function


@register_function
class Max(ReductionFunction):
    spec = ReductionFunction.reduction_spec("max", "maximum of a score over the image tokens alive")

    def reduce(self, values: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
        return values.masked_fill(~over, float("-inf")).amax(1, keepdim=True)
