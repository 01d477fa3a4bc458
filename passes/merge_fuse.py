"""`merge fuse of SET by SCORE`: EViT's inattentive-token fusion (Liang et al., "Not All Patches are What You
Need: Expediting Vision Transformers via Token Reorganizations", arXiv:2202.07800; youweiliang/evit).

The tokens of SET (protected ones excepted) become ONE token, sum_j score_j * x_j: EViT's code weighs each
fused token by the CLS attention it receives and sums, without dividing by the weights' sum. The fused token
takes the place of the member with the earliest patch (its slot at LLaVA's feature layer); its size is the
number of original patches in it. A set of one token is fused too (its row becomes score * x, as EViT does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge, staying

from policyc.catalog.base import Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Fuse(MergeOp):
    spec = Spec(
        "fuse", "merge", "fuse the tokens into one token, weighted by a score, in the place of their earliest "
        "member (EViT's inattentive-token fusion)",
        returns="set", by="score", paper="EViT arXiv:2202.07800", runs=frozenset({"encoder", "projector"}),
        needs=frozenset({"grid"}))

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        if rows.weights is None:
            raise PolicyError.at("merge fuse needs `by SCORE`, e.g. by attention(cls -> vision)", merge.span)
        patches = self.grid(merge, rows)
        members = rows.sources
        earliest = torch.where(members, patches, torch.iinfo(torch.long).max).argmin(1, keepdim=True)  # [B, 1]
        into = torch.where(members, earliest.expand_as(members), staying(members))
        return Folding(into, "weighted_sum", weights=rows.weights, fused=members)
