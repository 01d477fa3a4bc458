"""The base class of schedule operators: how many tokens a selection keeps at a layer of its stage.

`top geometric(0.5) of vision by s` asks the schedule for each row's count. Per-layer schedules (`LayerSchedule`:
`geometric`, `linear`, `cosine`) follow the layer of the stage and N0, the image tokens alive before its first
layer; adaptive ones (`mass`, `entropy`) read the selection's scores. A list literal `[300, 200, 110]` is the
language's explicit schedule (runtime/evaluate.py). Subclasses write one method: `counts`, or `LayerSchedule.budget`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from policyc.passes.base import CallOperator, registrar

from policyc.catalog.base import Spec
from policyc.catalog.schedules import SCHEDULES
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class ScheduleOp(CallOperator, ABC):
    """A selection's amount that varies by layer or adapts to the scores."""

    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, stages, paper, one-line summary
    adaptive: ClassVar[bool] = False  # the count reads the tokens' scores, not only sizes and layers
    reads_by: ClassVar[str | None] = None  # the signal the selection's `by` must call (rank: attention)

    @abstractmethod
    def counts(self, call: ir.Call, select: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
               score: torch.Tensor | None) -> torch.Tensor:
        """How many of each row's `candidates` ([B, L] bool) the selection keeps: [B] long (the caller clamps it to
        the candidates). `score` is the selection's score [B, L] where its selector computed it."""

    def selection_score(self, select: ir.Select, ctx: StageEvaluator, score: torch.Tensor | None,
                        given: ir.Expr | None = None) -> torch.Tensor:
        """The score an adaptive schedule reads: `given` (its own option), else the selection's `by`."""
        if given is not None:
            return ctx.score(given)
        if score is not None:
            return score
        if select.by is None:
            raise PolicyError.at(f"{self.spec.name}() reads the selection's score: write `by SCORE`", select.span)
        return ctx.score(select.by)


class LayerSchedule(ScheduleOp):
    """An amount set by the layer of the stage (`ctx.step` of `ctx.steps`) and N0: subclasses write `budget`."""

    @abstractmethod
    def budget(self, call: ir.Call, ctx: StageEvaluator, row: int) -> float:
        """Row `row`'s amount at this layer (truncated to a whole count, at least 0)."""

    def counts(self, call: ir.Call, select: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
               score: torch.Tensor | None) -> torch.Tensor:
        wanted = [max(0, int(self.budget(call, ctx, row))) for row in range(candidates.shape[0])]
        return torch.tensor(wanted, dtype=torch.long, device=candidates.device)

    def tokens(self, call: ir.Call, name: str, ctx: StageEvaluator, row: int) -> float:
        """Option `name` as a count of tokens: a count as given, a percentage of N0."""
        value = self.argument(call, name, ctx)
        if isinstance(value, ir.Percent):
            return ctx.origin_of(row) * value.value / 100
        return self.number(call, name, ctx)


SCHEDULE_OPS: dict[str, ScheduleOp] = {}
register_schedule = registrar(SCHEDULE_OPS, "schedule", catalog=SCHEDULES, kinds=("schedule",))
