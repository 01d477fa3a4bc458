"""`ceil(x)`: round up, per row, in a selection's amount (HiPrune's `top round(T * alpha / 5)`)."""

from __future__ import annotations

import torch
from policyc.passes.functions import RoundingFunction, register_function


@register_function
class Ceil(RoundingFunction):
    spec = RoundingFunction.rounding_spec("ceil", "round up")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.ceil(values)
