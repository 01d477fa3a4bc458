"""`floor(x)`: round down, per row, in a selection's amount (HiPrune's `top round(T * alpha / 5)`)."""

from __future__ import annotations

import torch
from policyc.passes.functions import RoundingFunction, register_function


@register_function
class Floor(RoundingFunction):
    spec = RoundingFunction.rounding_spec("floor", "round down")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.floor(values)
