"""`exp(x)`: the exponential of a score, token by token, or of a number."""

from __future__ import annotations

import torch
from policyc.passes.functions import ElementwiseFunction, register_function


@register_function
class Exp(ElementwiseFunction):
    spec = ElementwiseFunction.unary_spec("exp", "exponential")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.exp(values)
