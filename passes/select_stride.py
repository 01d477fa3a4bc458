"""`stride AMOUNT of SET`: every k-th token of the set in position order, k = max(1, size(set) // amount),
at most `amount` of them (VisionZip's contextual targets, arXiv:2412.04467: `arange(0, n, step)[:c]`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import selected_first
from policyc.passes.selectors import SelectorOp, ranked, register_selector

from policyc.catalog.base import Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_selector
class Stride(SelectorOp):
    spec = Spec(
        "stride", "selector", "every k-th token of the set in order, k = size(set) // amount (VisionZip's targets)",
        returns="set", paper="VisionZip arXiv:2412.04467")

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        sizes = candidates.sum(1)
        counts = ctx.counts(node, candidates)
        step = torch.clamp(sizes // counts.clamp(min=1), min=1)  # [B]
        order = selected_first(candidates)  # candidate positions ascending, then the rest
        rank = torch.arange(order.shape[1], device=order.device)[None]
        picked = (rank % step[:, None] == 0) & (rank // step[:, None] < counts[:, None]) & (rank < sizes[:, None])
        # move the picked ranks to the front (keeping position order) and take `picked.sum()` of them
        order = order.gather(1, selected_first(picked))
        return ranked(order, picked.sum(1)) & candidates
