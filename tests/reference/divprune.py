"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning", arXiv:2503.02175; vbdi/divprune),
written plainly from the paper and its code; shares no code with policyc.

Per image, on the projected image features X [N, D]: distances d(i, j) = 1 - cos(x_i, x_j). The first
token is argmax_j of the second-smallest entry of column j (its nearest other token). Then, k - 1 times,
max-min (DivPrune) adds argmax_j min_{s chosen} d(s, j) over the unchosen tokens, and max-sum (ToDRE v2)
argmax_j sum_{s chosen} d(s, j). argmax takes the first maximum. Returns the kept slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor


def divprune_keep(features: Tensor, count: int, objective: str = "min") -> Tensor:
    kept = torch.zeros(features.shape[:2], dtype=torch.bool)
    for image, x in enumerate(features):
        n = x.shape[0]
        unit = x / x.norm(dim=-1, keepdim=True)
        dist = [[1 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
        isolation = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
        chosen = [isolation.index(max(isolation))]
        while len(chosen) < count:
            best, best_spread = -1, float("-inf")
            for j in range(n):
                if j in chosen:
                    continue
                values = [dist[s][j] for s in chosen]
                spread = min(values) if objective == "min" else sum(values)
                if spread > best_spread:
                    best, best_spread = j, spread
            chosen.append(best)
        kept[image, chosen] = True
    return kept


__all__ = ["divprune_keep"]
