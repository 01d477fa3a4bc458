"""`top AMOUNT of SET by SCORE`: the highest-scoring tokens; ties go to the earlier position. With `mass(tau)`
as the amount each sample keeps the fewest tokens holding `tau` of the score mass (ZipVL;
passes/schedule_mass.py). With `top(allocate=S)` one budget per sample is split across its images
(passes/allocate.py), before the LLM and in it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.allocate import allocating, image_shares, selection_counts
from policyc.passes.selectors import SelectorOp, register_selector

from policyc.catalog.base import Spec
from policyc.catalog.selectors import ALLOCATE
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_selector
class Top(SelectorOp):
    spec = Spec(
        "top", "selector", "the tokens with the highest score; with `allocate` one budget per sample is split "
        "across its images (GlobalCom2, HiRED)", options=(ALLOCATE,), returns="set", by="score")

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("top needs `by SCORE`", node.span)
        score = ctx.score(node.by)

        def top(among: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return KERNELS["top_ranked"](score, among, counts)  # ties go to the earlier position

        if allocating(node, ctx) is not None and ctx.causal:  # the LLM: a prompt's budget split across its images
            chosen = torch.zeros_like(candidates)
            for among, counts in image_shares(node, candidates, ctx):
                chosen |= top(among, counts)
            return chosen
        return top(candidates, selection_counts(node, candidates, ctx, score))  # per image with allocate= pre-LLM
