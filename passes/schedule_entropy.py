"""`entropy(target, every=1, score=by)`: FlowCut's adaptive budget (arXiv:2505.19536), per image, across the layers
of a multi-layer stage before the LLM.

On the stage's last layer and every `every`-th one before it (r layers left after this one), N candidates keep
max(N - round((N - target) / sqrt(r) * (1 - (H / log N)^2)), target), H the entropy of the score normalised over
the candidates; on the last layer, `target`; elsewhere all N (and all N when N <= target).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.schedules import ScheduleOp, register_schedule

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_schedule
class Entropy(ScheduleOp):
    spec = Spec("entropy", "schedule", "adaptive: prune more where the score distribution is peaked, reaching "
                "`target` tokens by the stage's last layer, acting every `every` layers (FlowCut)",
                options=(Option("target", ("count",), "tokens left after the last layer", positional=True,
                                integer=True),
                         Option("every", ("number",), "act on the stage's last layer and every n-th layer before it",
                                default="1", low=1, integer=True),
                         Option("score", ("score",), "the distribution whose entropy sets the pace (FlowCut: the "
                                "CLS attention row)", default="by")),
                returns="schedule", paper="FlowCut arXiv:2505.19536", runs=frozenset({"encoder", "projector"}))
    adaptive = True

    def counts(self, call: ir.Call, select: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
               score: torch.Tensor | None) -> torch.Tensor:
        target = self.argument(call, "target", ctx)
        if not (isinstance(target, ir.Number) and isinstance(target.value, int)):
            raise PolicyError.at("entropy(target) takes a whole number", call.span)
        every = int(self.number(call, "every", ctx))
        layers = ctx.stage_layers  # type: ignore[attr-defined]  # VisionEvaluator
        left = len(layers) - 1 - layers.index(ctx.layer)  # type: ignore[attr-defined]
        sizes = candidates.sum(1)
        if left % every:
            return sizes
        if left == 0:
            return torch.minimum(sizes, torch.full_like(sizes, target.value))
        values = self.selection_score(select, ctx, score, self.argument(call, "score", ctx))
        values = values.float().masked_fill(~candidates, 0)
        p = values / values.sum(1, keepdim=True)
        entropy = -torch.where(candidates, p * torch.log(p), torch.zeros_like(p)).sum(1)
        ratio = entropy / torch.log(sizes.float())
        spread = torch.tensor([(n - target.value) / left ** 0.5 for n in sizes.tolist()], device=sizes.device)
        pruned = torch.round(spread.float() * (1 - ratio ** 2)).long()  # in float32, as FlowCut's code
        keep = torch.clamp(sizes - pruned, min=target.value)
        return torch.where(sizes > target.value, keep, sizes)
