"""`merge temporal(threshold=t) of SET by FEATURES`: temporal merging across video frames, as HoliTom's
(arXiv:2505.21334) and DyCoke's (arXiv:2411.15024, TTM) merge tokens that repeat from one frame to the next.

A video's tokens sit on frames (Qwen2-VL: groups of `temporal_patch_size` frames, h/2 x w/2 merged tokens each,
read from the model's `grid_thw`; LLaVA-OneVision: each input frame, its ceil(h/2) x ceil(w/2) pooled tokens,
read from the video's pixel_values; never guessed). For frame f >= 1 and spatial index s, the token (f, s) joins the
run of the token (f-1, s) when both are in SET, (f, s) is not protected, and the cosine similarity of their
features (as they were before this merge) exceeds `threshold` (strictly). A run of similar tokens (f0, s), ...,
(f1, s) becomes one token, the size-weighted average of its members (the plain average right after the projector),
in the slot and at the positions of its first frame's token. Separators (OneVision's newline) are on no frame
and never merge. Images are one frame: nothing merges (on image-only families too; families with videos whose
frames policyc does not read fail at compile time: runtime/support.py).
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
class Temporal(MergeOp):
    spec = Spec(
        "temporal", "merge", "merge each video token into the token at its spatial position in the previous frame "
        "(group) when their cosine similarity exceeds `threshold`, averaging each run of similar tokens into its "
        "first frame's slot (HoliTom's and DyCoke's temporal merging); images (one frame) are left alone",
        options=(Option("threshold", ("number",), "cosine similarity a token must exceed", default="0.9", low=-1,
                        high=1),),
        returns="set", by="feature", stages=frozenset({"projector"}), paper="HoliTom arXiv:2505.21334")

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        if rows.frames is None or rows.spots is None:  # image-only families: every image is one frame
            return Folding(staying(rows.sources), "wavg")
        threshold = self.number(merge, "threshold", 0.9, ctx)
        unit = self.features(merge, rows)  # [B, L', C], unit length
        batch, width = rows.sources.shape
        root = torch.cat([staying(rows.sources), torch.full((batch, 1), width, device=unit.device)], 1)
        frames, spots = int(rows.frames.max()) + 1, int(rows.spots.max()) + 1
        if frames < 2:
            return Folding(root[:, :width], "wavg")
        # the row at (frame, spot) of each sample: [B, frames * spots], `width` where no row is there
        member = rows.targets & (rows.frames >= 0)
        table = torch.full((batch, frames * spots + 1), width, dtype=torch.long, device=unit.device)
        key = torch.where(member, rows.frames * spots + rows.spots, frames * spots)
        table.scatter_(1, key, torch.arange(width, device=unit.device).expand(batch, -1))
        table = table[:, :-1].view(batch, frames, spots)
        sources = torch.cat([rows.sources, rows.sources.new_zeros(batch, 1)], 1)
        padded = torch.cat([unit, unit.new_zeros(batch, 1, unit.shape[-1])], 1)
        for frame in range(1, frames):
            now, before = table[:, frame], table[:, frame - 1]  # [B, spots]
            present = (now < width) & (before < width)
            similar = (padded.gather(1, now[:, :, None].expand(-1, -1, unit.shape[-1]))
                       * padded.gather(1, before[:, :, None].expand(-1, -1, unit.shape[-1]))).sum(-1) > threshold
            joins = present & sources.gather(1, now) & similar
            root.scatter_(1, torch.where(joins, now, width), torch.where(joins, root.gather(1, before), width))
        return Folding(root[:, :width], "wavg")
