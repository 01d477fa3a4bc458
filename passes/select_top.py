"""`top AMOUNT of SET by SCORE`: the highest-scoring tokens; ties go to the earlier position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import selected_first
from policyc.passes.selectors import SelectorOp, ranked, register_selector

from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_selector
class Top(SelectorOp):
    name = "top"

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("top needs `by SCORE`", node.span)
        score = ctx.score(node.by)
        counts = ctx.counts(node.amount, candidates.sum(1))
        order = torch.sort(score.float(), dim=1, descending=True, stable=True).indices  # best first, ties earlier
        order = order.gather(1, selected_first(candidates.gather(1, order)))  # candidates first, still best first
        return ranked(order, counts) & candidates
