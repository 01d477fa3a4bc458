"""`log(x)`: the natural logarithm of a score, token by token, or of a number."""

from __future__ import annotations

import torch
from policyc.passes.functions import ElementwiseFunction, register_function


@register_function
class Log(ElementwiseFunction):
    spec = ElementwiseFunction.unary_spec("log", "natural logarithm")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.log(values)
