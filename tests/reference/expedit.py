"""Expedit's token clustering (Liang et al., "Expediting Large-Scale Vision Transformer for Dense Prediction without
Fine-tuning", arXiv:2210.01035; `TokenClusteringBlock` of Expedit-SWAG / Expedit-Segmenter) in a LLaVA tower,
written plainly from the spec; shares no code with policyc. CLIP (CLS carried unchanged) and SigLIP towers.

Exact semantics of this reference, one image at a time (eager attention): after encoder layer `layer` the R x C
patch features x become h x w clusters (h = w = min(size, side)): centroids start as the mean of each adaptive
pooling region (rows floor(a·R/h) .. ceil((a+1)·R/h) - 1, columns alike); patch (y, x) sits in cell
(floor(y·h/R), floor(x·w/C)) and may join cluster (a, b) when |cell row - a| and |cell column - b| are at most
window // 2; `iters` times D[j, i] = ||x_i - s_j||² (inf outside the window), Q = softmax_j(-tau·D[:, i]),
s_j = Σ_i Q[j, i] x_i / Σ_i Q[j, i]. The later layers up to the feature layer run on [CLS,] s in raster order of
the cluster grid. Returns the projected features [I, N, D], cluster (a, b) in the slot of the earliest patch of
its cell (zeros in the other slots), and the filled slots [I, N]. With `reconstruct`, Expedit's reconstruction
layer: every patch i is y_i = Σ_j W[i, j] z_j, z the clusters at the feature layer, W[i, j] = exp(-tau_r ·
||x_i - s_j||²) from the patches x and clusters s at the clustering, zeroed below the k-th largest of row i, rows
L2-normalised; every slot is filled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastervlm import keep_slots
from reference.vision import attention, embed, feature_layer, has_cls, layers


def soft_clusters(x: Tensor, side: int, size: int, window: int, iters: int, tau: float) -> tuple[Tensor, list[int]]:
    """x [side * side, C] patch features: (the h * w cluster features [K, C], each cluster's earliest patch)."""
    h = w = min(size, side)
    grid = x.reshape(side, side, -1)
    centroids = []
    for a in range(h):
        for b in range(w):
            rows = slice(a * side // h, math.ceil((a + 1) * side / h))
            cols = slice(b * side // w, math.ceil((b + 1) * side / w))
            centroids.append(grid[rows, cols].reshape(-1, x.shape[1]).mean(0))
    s = torch.stack(centroids)  # [K, C]
    cells = [(y * h // side, c * w // side) for y in range(side) for c in range(side)]
    near = torch.tensor([[abs(cy - a) <= window // 2 and abs(cx - b) <= window // 2 for cy, cx in cells]
                         for a in range(h) for b in range(w)])  # [K, P]
    for _ in range(iters):
        distance = ((x[None, :, :] - s[:, None, :]) ** 2).sum(-1).masked_fill(~near, float("inf"))  # [K, P]
        q = torch.softmax(-tau * distance, dim=0)
        s = (q @ x) / q.sum(1, keepdim=True)
    first = [min(p for p, cell in enumerate(cells) if cell == (a, b)) for a in range(h) for b in range(w)]
    return s, first


def reconstruction(x: Tensor, clusters: Tensor, k: int, tau: float) -> Tensor:
    """Expedit's reconstruction weights [P, K]: W[i, j] = exp(-tau · ||x_i - s_j||²), zero below the k-th largest of
    row i, each row divided by its L2 norm."""
    weight = torch.exp(-tau * ((x[:, None, :] - clusters[None, :, :]) ** 2).sum(-1))
    kth = torch.sort(weight, dim=1, descending=True).values[:, min(k, weight.shape[1]) - 1]
    weight = torch.where(weight >= kth[:, None], weight, torch.zeros_like(weight))
    return weight / weight.norm(dim=1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def expedit_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, layer: int, size: int,
                           window: int = 5, iters: int = 5, tau: float = 0.02, reconstruct: bool = False,
                           k: int = 20, tau_r: float = 0.02) -> tuple[Tensor, Tensor]:
    cls = int(has_cls(model))
    side = int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        slots = list(range(side * side))
        for index, block in enumerate(list(layers(model))[: feature_layer(model) + 1]):
            out, _, _ = attention(block.self_attn, block.layer_norm1(x))
            x = x + out
            x = x + block.mlp(block.layer_norm2(x))
            if index == layer:
                clusters, slots = soft_clusters(x[cls:], side, size, window, iters, tau)
                weights = reconstruction(x[cls:], clusters, k, tau_r)  # [P, K]
                x = torch.cat([x[:cls], clusters])
        patches = torch.zeros(side * side, x.shape[1])
        patches[slots] = x[cls:]
        if reconstruct:  # every patch rebuilt from the clusters at the feature layer
            patches, slots = weights @ x[cls:], list(range(side * side))
        out, mask = keep_slots(model, patches, slots)
        features.append(out)
        filled.append(mask)
    return torch.stack(features), torch.stack(filled)


__all__ = ["expedit_image_features", "reconstruction", "soft_clusters"]
