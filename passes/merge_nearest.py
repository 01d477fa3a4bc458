"""`merge nearest(combine=add_mean) of SET into TARGETS by FEATURES`: VisionZip's contextual merge
(arXiv:2412.04467; dvlab-research/VisionZip). Each token of SET folds into its most similar target (cosine
of the features; ties to the earlier target). combine=add_mean: a target becomes itself plus the mean of
the tokens folded into it (VisionZip's code); combine=mean: the plain average of the group."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge, staying

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Nearest(MergeOp):
    spec = Spec(
        "nearest", "merge", "assign each token to its most similar target; each target becomes itself plus the "
        "mean of its assigned tokens, in its own slot (VisionZip contextual tokens)",
        options=(Option("combine", ("enum",), "`add_mean`: target + mean(assigned), as VisionZip's code; "
                        "`mean`: plain average", default="add_mean", choices=("add_mean", "mean")),),
        returns="set", by="feature", into=True, paper="VisionZip arXiv:2412.04467")

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        combine = self.option(merge, "combine", ctx)
        mode = "mean" if isinstance(combine, ir.Name) and combine.id == "mean" else "add_mean"
        metric = self.features(merge, rows)
        movers = rows.sources & ~rows.targets
        scores = (metric @ metric.transpose(1, 2)).masked_fill(~rows.targets[:, None, :], float("-inf"))
        nearest = scores.argmax(-1)  # [B, L'] first maximum: the earlier target on ties
        into = staying(rows.sources)
        has_target = rows.targets.any(1, keepdim=True)
        into = torch.where(movers & has_target, nearest, into)
        return Folding(into, mode)  # type: ignore[arg-type]
