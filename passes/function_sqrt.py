"""`sqrt(x)`: the square root of a score, token by token, or of a number."""

from __future__ import annotations

import torch
from policyc.passes.functions import ElementwiseFunction, register_function


@register_function
class Sqrt(ElementwiseFunction):
    spec = ElementwiseFunction.unary_spec("sqrt", "square root")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(values)
