"""`grid AMOUNT of SET`: the tokens of an a x b sub-grid spread uniformly over the R x C patch grid
(rows floor(i * R / a), columns floor(j * C / b)), with a = round(sqrt(k * R / C)) and b = round(k / a)
for k = the amount, each clamped to the grid: a plain spatial downsampling baseline. a * b is the
closest such sub-grid to k (exactly k for square k on a square grid, e.g. 25% of 24 x 24).
Only grid points in SET are chosen."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from policyc.passes.selectors import SelectorOp, register_selector

from policyc.catalog.base import Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


def grid_points(count: int, rows: int, cols: int) -> tuple[list[int], list[int]]:
    """The rows and columns of the sub-grid for `count` tokens on a `rows` x `cols` grid."""
    if count <= 0:
        return [], []
    a = min(rows, max(1, round(math.sqrt(count * rows / cols))))
    b = min(cols, max(1, round(count / a)))
    return [i * rows // a for i in range(a)], [j * cols // b for j in range(b)]


@register_selector
class Grid(SelectorOp):
    spec = Spec(
        "grid", "selector", "tokens on a uniform 2-D grid over the image patches (a downsampling baseline)",
        returns="set", stages=frozenset({"encoder", "projector", "llm"}),
        runs=frozenset({"encoder", "projector"}), needs=frozenset({"grid"}))

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        patches, (rows, cols) = ctx.patch_grid("grid", node)
        counts = ctx.counts(node, candidates)
        chosen = torch.zeros_like(candidates)
        for b, count in enumerate(counts.tolist()):
            grid_rows, grid_cols = grid_points(int(count), rows, cols)
            on_row = torch.isin(patches[b] // cols, torch.tensor(grid_rows, device=patches.device, dtype=torch.long))
            on_col = torch.isin(patches[b] % cols, torch.tensor(grid_cols, device=patches.device, dtype=torch.long))
            chosen[b] = on_row & on_col & (patches[b] >= 0)
        return chosen & candidates
