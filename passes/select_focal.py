"""`focal(strategy=rank|row) AMOUNT of SET by SCORE`: FoPru's two selections (arXiv:2411.14164, as coded in
HydraInfer's `focal_prunning`). `rank`: the AMOUNT highest-scoring tokens, as `top` (ties: the earlier position).
`row`: whole rows of the R x C patch grid, the floor(AMOUNT / C) rows whose candidates have the highest score sum
(ties: the earlier row), every candidate of those rows chosen; with a percentage p of a full grid that is
floor(R · p) rows, the code's ratio form. Either way the kept tokens stay in raster order (FoPru's reordering)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.allocate import selection_counts
from policyc.passes.selectors import SelectorOp, register_selector

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_selector
class Focal(SelectorOp):
    spec = Spec("focal", "selector", "FoPru's selection: rank keeps the highest-scoring tokens; row keeps whole "
                "patch-grid rows with the highest score sums, floor(amount / grid width) of them",
                options=(Option("strategy", ("enum",), "tokens (rank) or whole grid rows (row)", default="rank",
                                choices=("rank", "row")),),
                stages=frozenset({"encoder", "projector"}), returns="set", by="score", paper="FoPru arXiv:2411.14164")

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("focal needs `by SCORE`", node.span)
        score = ctx.score(node.by)  # [B, L]
        counts = selection_counts(node, candidates, ctx)  # [B] tokens
        strategy = self.option(node, "strategy", ctx)
        if not (isinstance(strategy, ir.Name) and strategy.id == "row"):
            return KERNELS["top_ranked"](score, candidates, counts)
        patches, (rows, cols) = ctx.patch_grid("focal(strategy=row)", node)
        row_of = torch.where(candidates & (patches >= 0), patches // cols, rows)  # [B, L]; `rows`: no grid row
        sums = torch.zeros(score.shape[0], rows + 1, dtype=torch.float64, device=score.device)
        sums = sums.scatter_add(1, row_of, score.double().masked_fill(~candidates, 0.0))[:, :rows]  # [B, R]
        order = torch.sort(sums, dim=1, descending=True, stable=True).indices  # [B, R] best row first
        wanted = torch.arange(rows, device=score.device)[None] < (counts // cols)[:, None]  # [B, R]
        chosen_rows = torch.zeros_like(wanted).scatter(1, order, wanted)
        chosen_rows = torch.cat([chosen_rows, torch.zeros_like(chosen_rows[:, :1])], 1)  # the no-row column
        return chosen_rows.gather(1, row_of) & candidates
