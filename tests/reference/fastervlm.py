"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv:2412.01818; Theia-4869/FasterVLM), written plainly from the paper and its code;
shares no code with policyc. CLIP towers only (it reads the CLS token's attention).

Exact semantics of this reference, one image at a time (eager attention): at LLaVA's feature layer, the CLS
row of the post-softmax attention, MEAN over heads, patch columns; the `tokens` patches with the highest
score by a descending stable sort (ties: the earlier patch) are kept in their original slots. Returns the
projected features [I, N, D] (zeros in empty slots) and the kept slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import attention, embed, feature_layer, layers, project


def cls_attention_rows(model: LlavaForConditionalGeneration, image: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Runs the tower up to the feature layer on one image: (patch features [N, C], the CLS row over the patch
    columns, mean over heads, of every layer 0..feature layer [N] each)."""
    x = embed(model, image)
    rows = []
    for layer in list(layers(model))[: feature_layer(model) + 1]:
        out, _, probabilities = attention(layer.self_attn, layer.layer_norm1(x))
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
        rows.append(probabilities[:, 0, 1:].mean(0))
    return x[1:], rows


def keep_slots(model: LlavaForConditionalGeneration, patches: Tensor, kept: list[int]) -> tuple[Tensor, Tensor]:
    """Projected features with only the `kept` slots filled: ([N, D], [N] bool)."""
    mask = torch.zeros(len(patches), dtype=torch.bool)
    mask[kept] = True
    projected = project(model, patches)
    return torch.where(mask[:, None], projected, torch.zeros_like(projected)), mask


def top_patches(score: Tensor, count: int) -> list[int]:
    return sorted(torch.sort(score, descending=True, stable=True).indices[:count].tolist())


@torch.no_grad()
def fastervlm_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, tokens: int,
                             ) -> tuple[Tensor, Tensor]:
    features, filled = [], []
    for image in pixel_values:
        patches, rows = cls_attention_rows(model, image)
        out, mask = keep_slots(model, patches, top_patches(rows[-1], tokens))
        features.append(out)
        filled.append(mask)
    return torch.stack(features), torch.stack(filled)


__all__ = ["cls_attention_rows", "fastervlm_image_features", "keep_slots", "top_patches"]
