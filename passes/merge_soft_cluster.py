"""`merge soft_cluster(size=h, window=w, iters=n, tau=t) of SET by FEATURES`: Expedit's token clustering layer
(Liang et al., "Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning", arXiv:2210.01035;
`TokenClusteringBlock` of Expedit-SWAG / Expedit-Segmenter), a soft local k-means on the R x C patch grid.

Features x_i [N, C] of the image's patches (SET must hold every patch of the grid, none protected); h x w clusters
(h = w = `size`, each at most the grid's side). Centroids start as the adaptive average pool of x to h x w; token
i's cell is (floor(y·h/R), floor(x·w/C)) (nearest interpolation of the cell labels) and it may join cluster j only
when j's cell is within ±(window // 2) cells of its own in both directions. `iters` times:
  D[j, i] = ||x_i||² + ||s_j||² - 2 s_j·x_i (+1e16 outside the window);  Q = softmax over clusters j of (-tau·D);
  s_j = Σ_i Q[j, i] x_i / max(Σ_i Q[j, i], 1e-16).
The merge is a soft folding: cluster j becomes the row of the earliest patch of its cell (so the h x w clusters stay
in raster order), which takes Σ_i Q[j, i] h_i / Σ_i Q[j, i] of the rows' hidden states h (s_j itself when the
features are `hidden`, as in Expedit); every other patch folds away. CLS and other rows outside SET are untouched.

`reconstruct=on` adds Expedit's token reconstruction layer: with s the clusters as they left the clustering, patch i
is rebuilt at the encoder output as y_i = Σ_j W[i, j] z_j, z the cluster tokens there, W[i, j] =
exp(-tau_r · ||x_i - s_j||²) kept for the k largest per patch (ties with the k-th kept), rows L2-normalised (not
summing to one, as the code). Every patch then reaches the projector: only the encoder's later layers are cheaper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class SoftCluster(MergeOp):
    spec = Spec("soft_cluster", "merge", "Expedit's token clustering: soft local k-means of the patches into an h x w "
                "grid of new tokens (centroids from average pooling, a window of cells, softmax(-tau * distance))",
                options=(Option("size", ("number",), "clusters per side (h = w, at most the grid's)", default="16",
                                low=1, integer=True),
                         Option("window", ("number",), "odd window of cells a token may join", default="5", low=1,
                                integer=True),
                         Option("iters", ("number",), "k-means iterations", default="5", low=1, integer=True),
                         Option("tau", ("number",), "inverse temperature of the softmax over clusters",
                                default="0.02", low=0),
                         Option("reconstruct", ("enum",), "on: rebuild every patch from the clusters at the encoder "
                                "output (encoder cost only); off: the clusters reach the projector", default="off",
                                choices=("off", "on")),
                         Option("k", ("number",), "clusters each patch is rebuilt from (reconstruct=on)",
                                default="20", low=1, integer=True),
                         Option("tau_r", ("number",), "inverse temperature of the reconstruction weights",
                                default="0.02", low=0)),
                stages=frozenset({"encoder"}), by="feature", paper="Expedit arXiv:2210.01035")

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        window = int(self.number(merge, "window", 5, ctx))
        if window % 2 == 0:
            raise PolicyError.at(f"soft_cluster(window={window}) needs an odd window (±window // 2 cells)", merge.span)
        iters = int(self.number(merge, "iters", 5, ctx))
        tau = self.number(merge, "tau", 0.02, ctx)
        if rows.features is None:
            raise PolicyError.at("merge soft_cluster needs `by FEATURES` (Expedit: by hidden)", merge.span)
        patches = self.grid(merge, rows)  # [B, L']
        grid_rows, grid_cols = ctx.grid_shape()
        side = int(self.number(merge, "size", 16, ctx))
        h, w = min(side, grid_rows), min(side, grid_cols)
        batch, width = patches.shape
        row_of = self._patch_rows(merge, rows, patches, grid_rows * grid_cols)  # [B, P] the row of each patch
        x = rows.features.float().gather(1, row_of[:, :, None].expand(-1, -1, rows.features.shape[-1]))  # [B, P, C]
        ys = torch.arange(grid_rows, device=x.device)[:, None].expand(grid_rows, grid_cols).flatten()
        xs = torch.arange(grid_cols, device=x.device)[None, :].expand(grid_rows, grid_cols).flatten()
        cell_y, cell_x = ys * h // grid_rows, xs * w // grid_cols  # [P] each patch's cell
        centroids = torch.nn.functional.adaptive_avg_pool2d(
            x.transpose(1, 2).reshape(batch, -1, grid_rows, grid_cols), (h, w)).flatten(2).transpose(1, 2)  # [B, K, C]
        clusters = torch.arange(h * w, device=x.device)
        near = ((cell_y[None] - clusters[:, None] // w).abs() <= window // 2) & \
            ((cell_x[None] - clusters[:, None] % w).abs() <= window // 2)  # [K, P]
        outside = (~near).to(x.dtype) * 1e16
        affinity = x.new_zeros(batch, h * w, grid_rows * grid_cols)
        for _ in range(iters):
            distance = (x * x).sum(-1)[:, None, :] + (centroids * centroids).sum(-1)[:, :, None] \
                - 2 * torch.einsum("bkc,bpc->bkp", centroids, x) + outside  # [B, K, P]
            affinity = torch.softmax(-distance * tau, dim=1)
            centroids = affinity @ x / affinity.sum(2, keepdim=True).clamp(min=1e-16)
        cell = cell_y * w + cell_x  # [P]
        first_patch = torch.full((h * w,), grid_rows * grid_cols, device=x.device).scatter_reduce(
            0, cell, torch.arange(grid_rows * grid_cols, device=x.device), "amin")  # [K] earliest patch of each cell
        receiver = row_of[:, first_patch]  # [B, K] the row each cluster becomes
        into = torch.arange(width, device=x.device).expand(batch, -1).clone()
        into.scatter_(1, row_of, receiver[:, cell])
        soft = x.new_zeros(batch, width, width)  # [B, L', L'] receiving row x contributing row
        soft[torch.arange(batch, device=x.device)[:, None, None], receiver[:, :, None], row_of[:, None, :]] = affinity
        reconstruct = self.option(merge, "reconstruct", ctx)
        if not (isinstance(reconstruct, ir.Name) and reconstruct.id == "on"):
            return Folding(into, "soft", affinity=soft)
        weights = self.reconstruction(x, centroids, int(self.number(merge, "k", 20, ctx)),
                                      self.number(merge, "tau_r", 0.02, ctx))  # [B, P, K]
        spread = x.new_zeros(batch, width, width)  # [B, L', L'] rebuilt row x cluster row
        spread[torch.arange(batch, device=x.device)[:, None, None], row_of[:, :, None], receiver[:, None, :]] = weights
        return Folding(into, "soft", affinity=soft, spread=spread)

    @staticmethod
    def reconstruction(x: torch.Tensor, clusters: torch.Tensor, k: int, tau: float) -> torch.Tensor:
        """Expedit's `TokenReconstructionBlock` weights [B, P, K] from the patches x [B, P, C] and the clusters
        [B, K, C] as they left the clustering: exp(-tau · squared distance), the k largest per patch (and any
        equal to the k-th), each patch's row L2-normalised."""
        distance = (x * x).sum(-1)[:, :, None] + (clusters * clusters).sum(-1)[:, None, :] \
            - 2 * torch.einsum("bpc,bkc->bpk", x, clusters)
        weight = torch.exp(-tau * distance)
        kth = weight.topk(min(k, weight.shape[2]), dim=2).values[:, :, -1:]
        return torch.nn.functional.normalize(torch.where(weight >= kth, weight, torch.zeros_like(weight)), dim=2)

    @staticmethod
    def _patch_rows(merge: ir.Merge, rows: MergeRows, patches: torch.Tensor, count: int) -> torch.Tensor:
        """The row holding each patch of the grid, [B, P]; fails unless every patch is a clusterable row."""
        member = rows.sources & (patches >= 0)
        if bool((member.sum(1) != count).any()) or bool((rows.targets & ~rows.sources & (patches >= 0)).any()):
            raise PolicyError.at("soft_cluster clusters the whole patch grid: every patch must be alive, in the set "
                                 "and unprotected", merge.span, "cluster before any drop or merge, of `vision`")
        ids = torch.arange(patches.shape[1], device=patches.device).expand_as(patches)
        row_of = torch.zeros(patches.shape[0], count + 1, dtype=torch.long, device=patches.device)
        return row_of.scatter(1, torch.where(member, patches, count), ids)[:, :count]
