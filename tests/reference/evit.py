"""EViT with token fusion (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations", arXiv:2202.07800; youweiliang/evit), written plainly from the paper and its code;
shares no code with policyc. CLIP towers only (it reads the CLS token's attention).

Exact semantics of this reference, one image at a time (eager attention), in each encoder layer up to LLaVA's
feature layer: x = x + attn(ln1(x)); in the chosen layers, with n the non-CLS tokens, the ceil(keep_rate * n)
with the highest CLS attention (post-softmax CLS row, mean over heads; descending stable sort) stay, and the
others become one token appended after them, sum_j a_j * x_j with a_j their CLS attention (not normalised);
then x = x + mlp(ln2(x)). Each token remembers its original patches; LLaVA's feature of a token sits in the
slot of its earliest patch. Returns the projected features [I, N, D] and the filled slots [I, N].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import attention, embed, feature_layer, layers, project


@torch.no_grad()
def evit_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, keep_rate: float,
                        fuse_layers: list[int]) -> tuple[Tensor, Tensor]:
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        members = [[i] for i in range(x.shape[0])]  # original positions; CLS is position 0
        for index, layer in enumerate(list(layers(model))[: feature_layer(model) + 1]):
            out, _, probabilities = attention(layer.self_attn, layer.layer_norm1(x))
            x = x + out
            n = x.shape[0] - 1
            kept = math.ceil(keep_rate * n)
            if index in fuse_layers and kept < n:
                cls_attention = probabilities[:, 0, 1:].mean(0)
                order = torch.sort(cls_attention, descending=True, stable=True).indices.tolist()
                top, rest = sorted(order[:kept]), order[kept:]
                fused = sum(x[1 + j] * cls_attention[j] for j in rest)
                x = torch.cat([x[:1], x[[1 + j for j in top]], fused[None]])
                members = [members[0], *(members[1 + j] for j in top), [p for j in rest for p in members[1 + j]]]
            x = x + layer.mlp(layer.layer_norm2(x))
        patches = sum(len(group) for group in members) - 1
        slots = torch.zeros(patches, x.shape[-1])
        kept_slots = torch.zeros(slots.shape[0], dtype=torch.bool)
        for row, group in enumerate(members[1:], start=1):
            slot = min(group) - 1
            slots[slot], kept_slots[slot] = x[row], True
        projected = project(model, slots)
        features.append(torch.where(kept_slots[:, None], projected, torch.zeros_like(projected)))
        filled.append(kept_slots)
    return torch.stack(features), torch.stack(filled)


__all__ = ["evit_image_features"]
