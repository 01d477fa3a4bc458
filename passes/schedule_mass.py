"""`mass(tau)`: the fewest tokens whose scores hold `tau` of the candidates' total score mass
(ZipVL's layer-wise adaptive ratio, arXiv:2410.08584, Eq. 6: p = min{p : sum of the p largest >= tau * total}).

Scores are normalized by their sum over the candidates, so any non-negative score works. Rules:
- candidates are ranked best first, ties to the earlier position (as `top`); the count does not depend on ties;
- `tau >= 1` keeps every candidate (zero-score ones included);
- otherwise at least one candidate is kept, and a token is kept when the mass ranked before it is below
  `tau * total` (exclusive running sum in float64, the total being the running sum's last value);
- candidates whose scores are all zero hold no mass to cut: all are kept;
- a negative score has no mass: a `PolicyError` at the policy line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.schedules import ScheduleOp, register_schedule

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError, Span
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_schedule
class Mass(ScheduleOp):
    spec = Spec("mass", "schedule", "adaptive: the fewest tokens whose scores hold `tau` of the total score mass "
                "(ZipVL)",
                options=(Option("tau", ("number",), "mass to keep", positional=True, low=0, high=1),),
                returns="schedule", paper="ZipVL arXiv:2410.08584")
    adaptive = True

    def counts(self, call: ir.Call, select: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
               score: torch.Tensor | None) -> torch.Tensor:
        tau = self.number(call, "tau", ctx)
        return mass_counts(self.selection_score(select, ctx, score), candidates, tau, call.span)



def mass_counts(scores: torch.Tensor, candidates: torch.Tensor, tau: float, span: Span | None = None,
                validate: bool = True) -> torch.Tensor:
    """How many candidates hold `tau` of the mass, per row: scores and candidates [..., n] -> [...] long.
    `validate=False` skips the check for negative scores (a host sync) where scores are probabilities."""
    values = scores.double().masked_fill(~candidates, 0.0)
    sizes = candidates.sum(-1)
    if validate and bool((values < 0).any()):
        raise PolicyError.at("mass() needs non-negative scores: a negative score holds no attention mass", span,
                             "rank by attention (probabilities) or another non-negative score")
    if tau >= 1:
        return sizes
    ordered = torch.sort(values, dim=-1, descending=True, stable=True).values
    running = ordered.cumsum(-1)
    total = running[..., -1:]
    before = torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)
    counts = (before < tau * total).sum(-1).clamp(min=1)
    counts = torch.where(total[..., 0] > 0, counts, sizes)  # all zero: nothing to rank by
    return torch.minimum(counts, sizes)


def mass_keep(scores: torch.Tensor, candidates: torch.Tensor, tau: float, span: Span | None = None,
              validate: bool = True) -> torch.Tensor:
    """[..., n] bool: the candidates holding `tau` of the mass, best first, ties to the earlier position."""
    counts = mass_counts(scores, candidates, tau, span, validate)
    ranked = scores.double().masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())
    return candidates & (rank < counts[..., None])
