"""Average-pool downsampling of LLaVA's image features before the LLM (a plain baseline), written
plainly; shares no code with policyc.

Exact semantics: the N image features of each image lie on the R x C patch grid in raster order. The grid
is tiled with k x k windows from the top-left (windows at the right and bottom edges hold what is left);
each window becomes the plain mean of its features, placed in the slot of its top-left patch. Returns the
features [I, N, D] (zeros in empty slots) and the filled slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor


def pool_features(features: Tensor, grid: tuple[int, int], k: int) -> tuple[Tensor, Tensor]:
    rows, cols = grid
    out = torch.zeros_like(features)
    filled = torch.zeros(features.shape[:2], dtype=torch.bool)
    for image in range(features.shape[0]):
        for top in range(0, rows, k):
            for left in range(0, cols, k):
                window = [r * cols + c for r in range(top, min(top + k, rows))
                          for c in range(left, min(left + k, cols))]
                out[image, window[0]] = features[image, window].mean(0)
                filled[image, window[0]] = True
    return out, filled


__all__ = ["pool_features"]
