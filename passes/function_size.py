"""`size(set)`: how many tokens a set holds, per row (HiPrune's `top T - size(buffers)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.functions import AmountFunction, register_function

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_function
class Size(AmountFunction):
    spec = Spec("size", "function", "number of tokens in a set",
                options=(Option("set", ("set",), "token set", positional=True),), returns="count")

    def amount(self, call: ir.Call, ctx: StageEvaluator, batch: int) -> torch.Tensor:
        return ctx.set(call.args[0]).sum(1).double()
