"""HiPrune (arXiv:2508.00553; Danielement321/HiPrune), written plainly from the paper and the spec of its
code (/work/shared/research/algorithms.md §11); shares no code with policyc. CLIP and SigLIP towers.

Exact semantics of this reference, one image at a time (eager attention):
- global attention g(l): layer l's post-softmax attention, mean over heads, then mean over EVERY query row
  (CLS included), patch columns.
- anchors: the round(tokens * alpha / 5) patches with the highest g(object_layer) (Python round: half to
  even), by a descending stable sort; buffers: each anchor's p - 1, p + 1, p - W, p + W, clamped to
  [0, N - 1] (no row-wrap guard).
- registers: g(feature layer) minus 1 on the anchors and buffers, the top tokens - |anchors | buffers|.
- the kept patches stay in their slots. Returns the projected features [I, N, D] and the kept slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastervlm import keep_slots, top_patches
from reference.vision import attention, embed, feature_layer, has_cls, layers


@torch.no_grad()
def hiprune_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, tokens: int, alpha: float,
                           object_layer: int) -> tuple[Tensor, Tensor]:
    first = int(has_cls(model))
    width = int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        received = []
        for layer in list(layers(model))[: feature_layer(model) + 1]:
            out, _, probabilities = attention(layer.self_attn, layer.layer_norm1(x))
            x = x + out
            x = x + layer.mlp(layer.layer_norm2(x))
            received.append(probabilities.mean(0).mean(0)[first:])
        patches = x[first:]
        count = len(patches)
        anchors = top_patches(received[object_layer], round(tokens * alpha / 5))
        chosen = set(anchors)
        for p in anchors:
            for q in (p - 1, p + 1, p - width, p + width):
                chosen.add(min(max(q, 0), count - 1))
        deep = received[-1].clone()
        deep[sorted(chosen)] -= 1
        registers = top_patches(deep, tokens - len(chosen))
        out, mask = keep_slots(model, patches, sorted(chosen | set(registers)))
        features.append(out)
        filled.append(mask)
    return torch.stack(features), torch.stack(filled)


__all__ = ["hiprune_image_features"]
