"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv:2412.04467; dvlab-research/VisionZip), written plainly from the paper and its code; shares no code
with policyc. CLIP towers only (it reads the CLS token's attention).

Exact semantics of this reference, one image at a time, at LLaVA's feature layer (eager attention):
- dominant: the `dominant` patches the CLS token attends to most (post-softmax attention of the CLS row,
  SUMMED over heads, patch columns), by a descending stable sort. (VisionZip's code also passes CLS itself
  to the LLM and counts it among the dominant tokens; LLaVA drops CLS, and here `dominant` counts patches.)
- contextual: the other patches in index order; targets = rest[arange(0, n, max(1, n // contextual))]
  [:contextual]; every other patch goes to the target with the highest cosine similarity of the layer's
  head-mean keys (the earlier target on ties); a target becomes x_target + mean(x of its patches).
- LLaVA's features: each kept token in the slot of its earliest patch. Returns the projected features
  [I, N, D] (zeros in empty slots) and the filled slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import attention, embed, feature_layer, layers, project


@torch.no_grad()
def visionzip_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, dominant: int,
                             contextual: int) -> tuple[Tensor, Tensor]:
    last = feature_layer(model)
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        for layer in list(layers(model))[: last + 1]:
            out, keys, probabilities = attention(layer.self_attn, layer.layer_norm1(x))
            x = x + out
            x = x + layer.mlp(layer.layer_norm2(x))
        patches = x[1:]
        cls_attention = probabilities[:, 0, 1:].sum(0)
        order = torch.sort(cls_attention, descending=True, stable=True).indices.tolist()
        dominant_set = sorted(order[:dominant])
        rest = [p for p in range(len(patches)) if p not in dominant_set]
        step = max(1, len(rest) // contextual) if rest else 1
        targets = rest[::step][:contextual]
        metric = keys.mean(0)[1:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        groups: dict[int, list[int]] = {t: [] for t in targets}
        for p in rest:
            if p in groups:
                continue
            similarity = torch.stack([metric[p] @ metric[t] for t in targets])
            groups[targets[int(similarity.argmax())]].append(p)
        slots = torch.zeros_like(patches)
        kept = torch.zeros(len(patches), dtype=torch.bool)
        for p in dominant_set:
            slots[p], kept[p] = patches[p], True
        for target, assigned in groups.items():
            merged = patches[target] + (torch.stack([patches[p] for p in assigned]).mean(0) if assigned else 0)
            slot = min([target, *assigned])
            slots[slot], kept[slot] = merged, True
        projected = project(model, slots)
        features.append(torch.where(kept[:, None], projected, torch.zeros_like(projected)))
        filled.append(kept)
    return torch.stack(features), torch.stack(filled)


__all__ = ["visionzip_image_features"]
