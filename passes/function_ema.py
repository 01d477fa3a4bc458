"""`ema(x, decay=0.5)`: an exponential moving average of a score across the layers of a multi-layer stage
(FlowCut, arXiv:2505.19536, accumulates its information flow this way): x at the stage's first layer, then
decay * previous + (1 - decay) * x. Before the LLM, where stages remember across their layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.functions import ScoreFunction, register_function

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_function
class Ema(ScoreFunction):
    spec = Spec("ema", "function", "exponential moving average of a score across the layers of a multi-layer stage "
                "(FlowCut's information flow)",
                options=(Option("x", ("score",), "per-token score", positional=True),
                         Option("decay", ("number",), "weight of the previous layers", default="0.5", low=0, high=1)),
                returns="score", paper="FlowCut arXiv:2505.19536", runs=frozenset({"encoder", "projector"}))

    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        x = ctx.score(call.args[0])
        decay = self.number(call, "decay", ctx)
        previous = ctx.carried(call)  # type: ignore[attr-defined]  # VisionEvaluator: None at the stage's first layer
        value = x if previous is None else decay * previous + (1 - decay) * x
        ctx.carry(call, value)  # type: ignore[attr-defined]
        return value
