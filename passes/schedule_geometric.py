"""`geometric(ratio)`: PyramidDrop's schedule (arXiv:2410.17247), keeping int(N0 * ratio^(i+1)) tokens at the
i-th layer of the stage, N0 the image tokens alive before its first layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from policyc.passes.schedules import LayerSchedule, register_schedule

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_schedule
class Geometric(LayerSchedule):
    spec = Spec("geometric", "schedule", "keep N0 * ratio^(i+1) tokens at the i-th layer of the stage (PyramidDrop's "
                "lambda)",
                options=(Option("ratio", ("number",), "lambda, the share kept at each step", positional=True, low=0,
                                high=1),),
                returns="schedule", paper="PyramidDrop arXiv:2410.17247", runs=frozenset({"llm"}))

    def budget(self, call: ir.Call, ctx: StageEvaluator, row: int) -> float:
        return ctx.origin_of(row) * self.number(call, "ratio", ctx) ** (ctx.step + 1)
