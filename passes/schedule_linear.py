"""`linear(start, end)`: an amount moving linearly from `start` at the stage's first layer to `end` at its last
(ToMe's decreasing r schedule, arXiv:2210.09461, is linear(2r, 0)); percentages are of N0."""

from __future__ import annotations

from typing import TYPE_CHECKING

from policyc.passes.schedules import LayerSchedule, register_schedule

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


START_END = (Option("start", ("count", "percent"), "amount at the first layer", positional=True),
             Option("end", ("count", "percent"), "amount at the last layer", positional=True))


@register_schedule
class Linear(LayerSchedule):
    spec = Spec("linear", "schedule", "an amount moving linearly from `start` at the first layer to `end` at the "
                "last (ToMe's decreasing r schedule is linear(2r, 0))",
                options=START_END, returns="schedule", paper="ToMe arXiv:2210.09461", runs=frozenset({"llm"}),
                multi_layer=True)

    def budget(self, call: ir.Call, ctx: StageEvaluator, row: int) -> float:
        start, end = self.tokens(call, "start", ctx, row), self.tokens(call, "end", ctx, row)
        return start + (end - start) * self.progress(ctx)

    def progress(self, ctx: StageEvaluator) -> float:
        """How far through the stage's layers this one is: 0 at the first, 1 at the last."""
        return ctx.step / max(1, ctx.steps - 1)
