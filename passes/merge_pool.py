"""`merge pool(size=k) of SET`: average-pool the image patch grid with non-overlapping k x k windows from the
top-left (windows at the right and bottom edges hold what is left). The tokens of SET in a window become
their plain average, represented by the window's earliest patch (a plain downsampling baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Pool(MergeOp):
    spec = Spec(
        "pool", "merge", "average-pool the image patch grid with a k x k window (plain downsampling baseline)",
        options=(Option("size", ("number",), "window side k", default="2", low=2, integer=True),),
        returns="set", stages=frozenset({"encoder", "projector"}), needs=frozenset({"grid"}))

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        k = int(self.number(merge, "size", 2, ctx))
        patches = self.grid(merge, rows)
        _, grid_cols = ctx.grid_shape()
        batch, width = patches.shape
        members = (rows.sources | rows.targets) & (patches >= 0)
        window = (patches // grid_cols // k) * ((grid_cols + k - 1) // k) + (patches % grid_cols) // k
        windows = int(window.max()) + 2 if width else 1
        window = torch.where(members, window, windows - 1)  # non-members share a dummy window
        # the receiving row of each window: its member with the smallest patch index (a target)
        receiving = rows.targets & members
        key = torch.where(receiving, patches, torch.iinfo(torch.long).max)
        first_patch = torch.full((batch, windows), torch.iinfo(torch.long).max, device=patches.device)
        first_patch = first_patch.scatter_reduce(1, window, key, reduce="amin")
        is_receiver = receiving & (patches == first_patch.gather(1, window))
        row_ids = torch.arange(width, device=patches.device).expand(batch, -1)
        receiver = torch.full((batch, windows), -1, dtype=torch.long, device=patches.device)
        receiver = receiver.scatter_reduce(1, window, torch.where(is_receiver, row_ids, -1), reduce="amax")
        target = receiver.gather(1, window)
        into = torch.where(rows.sources & members & (target >= 0), target, row_ids)
        return Folding(into, "mean")
