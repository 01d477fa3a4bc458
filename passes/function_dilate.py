"""`dilate(set, radius=1)`: a token set grown by its neighbours on the image patch grid (HiPrune's buffer
tokens, arXiv:2508.00553; Danielement321/HiPrune).

As HiPrune's code does it: each patch p adds p - 1, p + 1, p - W and p + W (W the grid width), clamped to
the first and last patch, with no guard at row ends (p + 1 of a row's last patch is the next row's first).
`radius=r` repeats this r times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.functions import SetFunction, register_function

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_function
class Dilate(SetFunction):
    spec = Spec("dilate", "function", "a set grown by its neighbours on the image patch grid (HiPrune's buffer "
                "tokens)",
                options=(Option("set", ("set",), "token set", positional=True),
                         Option("radius", ("number",), "grid distance (4-neighbourhood steps)", default="1", low=1,
                                integer=True)),
                returns="set", stages=frozenset({"encoder", "projector"}), paper="HiPrune arXiv:2508.00553",
                needs=frozenset({"grid"}))

    def members(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        patches, grid = ctx.patch_grid("dilate()", call)
        radius = int(self.number(call, "radius", ctx))
        return dilate(ctx.set(call.args[0]), patches, grid, radius) & ctx.builtin("vision")


def dilate(members: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int], radius: int = 1) -> torch.Tensor:
    """members: [B, L] bool over positions; patches: [B, L] long, each position's patch index (-1: not a patch);
    grid: (rows, columns). Returns the grown set over the same positions, [B, L] bool (patches only)."""
    rows, columns = grid
    count = rows * columns
    is_patch = patches >= 0
    index = patches.clamp(min=0)
    on_grid = torch.zeros(members.shape[0], count, device=members.device)
    on_grid = on_grid.scatter_add(1, index, (members & is_patch).float())
    cells = torch.arange(count, device=members.device)
    for _ in range(radius):
        grown = on_grid.clone()
        for offset in (-1, 1, -columns, columns):
            grown = grown.index_add(1, (cells + offset).clamp(0, count - 1), on_grid)
        on_grid = grown
    return (on_grid.gather(1, index) > 0) & is_patch
