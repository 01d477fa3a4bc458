"""`cosine(start, end)`: p-MoD's progressive ratio decay (arXiv:2412.04449), a shifted cosine from `start` at the
stage's first layer to `end` at its last: start + (end - start) * (1 - cos(pi * i / (n - 1))) / 2."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from policyc.passes.schedule_linear import START_END, Linear
from policyc.passes.schedules import register_schedule

from policyc.catalog.base import Spec

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_schedule
class Cosine(Linear):
    spec = Spec("cosine", "schedule", "an amount following a cosine decay from `start` to `end` over the stage's "
                "layers (p-MoD's progressive ratio decay)",
                options=START_END, returns="schedule", paper="p-MoD arXiv:2412.04449", runs=frozenset({"llm"}),
                multi_layer=True)

    def progress(self, ctx: StageEvaluator) -> float:
        return (1 - math.cos(math.pi * super().progress(ctx))) / 2
