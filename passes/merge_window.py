"""`merge window(size=k, threshold=t) of SET by FEATURES`: MustDrop's local spatial merge (arXiv:2411.10803;
liuting20/MustDrop `conditional_pooling`).

The patch grid is tiled with non-overlapping k x k windows from the top-left (windows that do not fit are
left alone). A window whose k^2 tokens are all in SET scores the mean pairwise cosine similarity of their
features over distinct pairs. Windows scoring at least `threshold` are eligible; each image merges its
n most similar eligible windows, n = the fewest eligible windows of any image in the batch (MustDrop's
`r = min over the batch`). In a merged window every token folds into the bottom-right one by size-weighted
average; the group's representative is its top-left patch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge, staying

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Window(MergeOp):
    spec = Spec(
        "window", "merge", "merge each non-overlapping k x k window whose mean pairwise cosine similarity is at "
        "least `threshold` into one token, at the window's top-left patch (MustDrop's local spatial merge)",
        options=(Option("size", ("number",), "window side k", default="3", low=2, integer=True),
                 Option("threshold", ("number",), "similarity threshold", default="0.8", low=-1, high=1)),
        returns="set", by="feature", stages=frozenset({"encoder", "projector"}), paper="MustDrop arXiv:2411.10803",
        needs=frozenset({"grid"}))

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        k = int(self.number(merge, "size", 3, ctx))
        threshold = self.number(merge, "threshold", 0.8, ctx)
        patches = self.grid(merge, rows)
        grid_rows, grid_cols = ctx.grid_shape()
        metric = self.features(merge, rows)
        batch, width = patches.shape
        # row of each patch ([B, R*C], -1 where the patch is no member of the set)
        member = rows.targets & (patches >= 0)
        row_of = torch.full((batch, grid_rows * grid_cols + 1), -1, dtype=torch.long, device=patches.device)
        row_ids = torch.arange(width, device=patches.device).expand(batch, -1)
        row_of.scatter_(1, torch.where(member, patches, grid_rows * grid_cols), row_ids)
        row_of = row_of[:, :-1]
        windows = [[(wr * k + i) * grid_cols + wc * k + j for i in range(k) for j in range(k)]
                   for wr in range(grid_rows // k) for wc in range(grid_cols // k)]
        if not windows:
            return Folding(staying(rows.sources), "wavg")
        index = torch.tensor(windows, device=patches.device)  # [W, k*k] patch indices, raster order
        window_rows = row_of[:, index]  # [B, W, k*k]
        movable = rows.sources.gather(1, window_rows.clamp(min=0).flatten(1)).view(window_rows.shape)
        complete = (window_rows >= 0).all(-1) & movable[:, :, :-1].all(-1)  # the last token receives
        unit = metric[torch.arange(batch, device=metric.device)[:, None, None], window_rows.clamp(min=0)]
        sims = unit @ unit.transpose(-1, -2)  # [B, W, k*k, k*k]
        off_diagonal = 1 - torch.eye(k * k, device=sims.device)
        similarity = (sims * off_diagonal).sum((-1, -2)) / (k * k * (k * k - 1))
        eligible = complete & (similarity >= threshold)
        count = int(eligible.sum(1).min())
        into = staying(rows.sources)
        if count == 0:
            return Folding(into, "wavg")
        chosen = similarity.masked_fill(~eligible, float("-inf")).topk(count, dim=1).indices  # [B, n]
        chosen_rows = window_rows.gather(1, chosen[:, :, None].expand(-1, -1, k * k))  # [B, n, k*k]
        receivers = chosen_rows[:, :, -1:].expand(-1, -1, k * k - 1)
        into.scatter_(1, chosen_rows[:, :, :-1].reshape(batch, -1), receivers.reshape(batch, -1))
        return Folding(into, "wavg")
