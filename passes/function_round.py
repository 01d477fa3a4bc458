"""`round(x)`: round to the nearest whole number (halves to even, as Python's round), per row,
in a selection's amount (HiPrune's `top round(T * alpha / 5)`)."""

from __future__ import annotations

import torch
from policyc.passes.functions import RoundingFunction, register_function


@register_function
class Round(RoundingFunction):
    spec = RoundingFunction.rounding_spec("round", "round to the nearest whole number (halves to even, as "
                                          "Python's round)")

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values)
