"""`abs(x)`: the absolute value of a score, token by token, or of a number (`max(0, x)` is `(x + abs(x)) / 2`)."""

from __future__ import annotations

import torch
from policyc.passes.functions import ElementwiseFunction, register_function


@register_function
class Abs(ElementwiseFunction):
    spec = ElementwiseFunction.unary_spec("abs", "absolute value")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.abs(values)
