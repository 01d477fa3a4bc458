"""`merge turbo(r=R, semantic=SCORE, alpha=5, scale=100, threshold=40, proportional=false, order=spatial) of SET
by FEATURES`: Turbo's informativity-driven bipartite merge (Ju et al., ECCV'24, arXiv:2407.11717;
anakin-skywalker-Joseph/Folder `bipartite_unimodal_matching`, Turbo mode; algorithms-more.md §2).

ToMe's bipartite soft matching (`merge bipartite`, shared code) with the A rows ranked by their information
degree instead of their redundancy alone: E_i = max_j cos(m_Ai, m_Bj) - alpha * scale * semantic(A_i), where
`semantic` is the CLS token's attention to each row (the code: the layer's CLS query row, mean over heads).
The penalty is constant over j, so it only changes WHICH A rows merge, never where: each still folds into its
most similar B row, by size-weighted average. r = min(r, |set| // 2) as ToMe; a layer whose current rows (CLS
included) number fewer than `threshold` merges nothing (the code's r_threshold). The code's layer weight
beta^|gamma - layer| is 1 at its defaults (beta=1, gamma=0) and is not offered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merge_bipartite import Bipartite, bipartite_folding
from policyc.passes.merges import Folding, MergeRows, register_merge, staying

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Turbo(Bipartite):
    spec = Spec(
        "turbo", "merge", "Turbo's informativity-driven ToMe: bipartite soft matching whose A tokens are ranked by "
        "redundancy minus alpha * scale * their semantic value (the CLS attention), merged by size-weighted average",
        options=(Option("r", ("count",), "tokens removed per layer"),
                 Option("semantic", ("score",), "each token's semantic value, e.g. attention(cls -> vision)"),
                 Option("alpha", ("number",), "weight of the semantic value (Turbo's alpha)", default="5", low=0),
                 Option("scale", ("number",), "the code's constant C: 100 in its LLaVA merge, 30 in BLIP's",
                        default="100", low=0),
                 Option("threshold", ("number",), "merge nothing when the layer has fewer rows (CLS included)",
                        default="40", low=0, integer=True),
                 Option("proportional", ("enum",), "add log(size) to later attention logits (BLIP's Turbo; "
                        "LLaVA's code runs without)", default="false", choices=("true", "false")),
                 Option("order", ("enum",), "the order the tokens reach the LLM in: `spatial`, each at its earliest "
                        "patch; `code`, the rows as the merges leave them (unmerged A, then B)",
                        default="spatial", choices=("spatial", "code"))),
        returns="set", by="feature", stages=frozenset({"encoder"}), paper="Turbo arXiv:2407.11717")

    def proportional(self, merge: ir.Merge, ctx: StageEvaluator) -> bool:
        value = self.option(merge, "proportional", ctx)
        return isinstance(value, ir.Name) and value.id == "true"

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        r_value, semantic = self.option(merge, "r", ctx), self.option(merge, "semantic", ctx)
        if not (isinstance(r_value, ir.Number) and isinstance(r_value.value, int)):
            raise PolicyError.at("turbo(r=...) takes a whole number", merge.span)
        if semantic is None:
            raise PolicyError.at("merge turbo needs semantic=SCORE", merge.span, "semantic=attention(cls -> vision)")
        metric = self.features(merge, rows)  # [B, L', C] unit vectors
        if metric.shape[1] < self.number(merge, "threshold", 40, ctx):
            return Folding(staying(rows.sources), "wavg")
        weight = self.number(merge, "alpha", 5, ctx) * self.number(merge, "scale", 100, ctx)
        value = ctx.score(semantic).gather(1, ctx.state.kept).float()  # [B, L'] the current rows' semantic value
        best, match, _ = KERNELS["bipartite_match"](metric, rows.sources, rows.targets)  # [B, |A|] each
        degree = best - weight * value[:, ::2]  # -inf stays -inf: rows that may not fold
        order = torch.sort(degree, dim=1, descending=True, stable=True).indices
        return bipartite_folding(rows, r_value.value, degree, match, order)
