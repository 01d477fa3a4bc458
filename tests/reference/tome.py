"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", arXiv:2210.09461; facebookresearch/ToMe) in a
LLaVA vision tower, written plainly from the paper and its `bipartite_soft_matching` / `merge_wavg` /
`ToMeAttention`; shares no code with policyc.

Exact semantics of this reference, one image at a time:
- In every encoder layer up to LLaVA's feature layer: x = x + attn(ln1(x)) with log(size) added to every
  attention logit of key j (proportional attention; sizes start at 1), then bipartite soft matching on
  x, then x = x + mlp(ln2(x)).
- Matching: metric = the layer's attention keys, mean over heads, L2-normalised. A = tokens 0, 2, 4, ...,
  B = tokens 1, 3, ...; scores = cosine; the CLS token (a[0], CLIP only) never merges (its row is -inf).
  r = min(r, (t - protected) // 2). Each A token's best B match; the r A tokens with the highest best
  score (descending, stable) merge into their matches: x_b = sum(size * x) / sum(size) over the group,
  size_b = sum(size). Output order: the unmerged A tokens in index order (ToMe's code with a class token;
  without one ToMe leaves them in score order: policyc keeps index order, and so does this reference),
  then all of B.
- Each token remembers its original members; LLaVA's image feature of a token sits in the slot of its
  earliest original patch. Returns the projected features [N, D] per slot and the slots filled.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import attention, embed, feature_layer, has_cls, layers, project, strategy_start


def bipartite(x: Tensor, keys: Tensor, size: Tensor, members: list[list[int]], r: int, cls: bool,
              ) -> tuple[Tensor, Tensor, list[list[int]]]:
    tokens = x.shape[0]
    r = min(r, (tokens - int(cls)) // 2)
    if r <= 0:
        return x, size, members
    metric = keys.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    scores = metric[a] @ metric[b].T
    if cls:
        scores[0, :] = float("-inf")
    best, match = scores.max(dim=-1)
    ranking = torch.sort(best, descending=True, stable=True).indices.tolist()
    merged, unmerged = ranking[:r], sorted(ranking[r:])
    sums = [x[j] * size[j] for j in b]
    sizes = [size[j].clone() for j in b]
    groups = [list(members[j]) for j in b]
    for i in merged:
        j = int(match[i])
        sums[j] = sums[j] + x[a[i]] * size[a[i]]
        sizes[j] = sizes[j] + size[a[i]]
        groups[j] += members[a[i]]
    new_x = torch.stack([x[a[i]] for i in unmerged] + [s / n for s, n in zip(sums, sizes, strict=True)])
    new_size = torch.stack([size[a[i]] for i in unmerged] + sizes)
    return new_x, new_size, [members[a[i]] for i in unmerged] + groups


@torch.no_grad()
def tome_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, r: int,
                        ) -> tuple[Tensor, Tensor]:
    """Projected image features [I, N, D] (zeros in empty slots) and the filled slots [I, N] bool."""
    cls, start, last = has_cls(model), strategy_start(model), feature_layer(model)
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        tokens = x.shape[0]
        size = torch.ones(tokens)
        members = [[i] for i in range(tokens)]
        for layer in list(layers(model))[: last + 1]:
            out, keys, _ = attention(layer.self_attn, layer.layer_norm1(x), size.log())
            x = x + out
            x, size, members = bipartite(x, keys, size, members, r, cls)
            x = x + layer.mlp(layer.layer_norm2(x))
        slots = torch.zeros(tokens - start, x.shape[-1])
        kept = torch.zeros(tokens - start, dtype=torch.bool)
        for row, group in enumerate(members):
            slot = min(group) - start
            if slot >= 0:
                slots[slot], kept[slot] = x[row], True
        projected = project(model, slots)
        features.append(torch.where(kept[:, None], projected, torch.zeros_like(projected)))
        filled.append(kept)
    return torch.stack(features), torch.stack(filled)


__all__ = ["tome_image_features"]
