"""Turbo (Ju et al., ECCV'24, arXiv:2407.11717; anakin-skywalker-Joseph/Folder, Turbo mode) in a LLaVA vision tower,
written plainly from algorithms-more.md §2 (the code's `bipartite_unimodal_matching`, `merge_wavg_ours`,
`FolderEncoderLayer`); shares no code with policyc.

One image at a time, in every encoder layer up to LLaVA's feature layer: x = x + attn(ln1(x)) (with log(size)
added to every logit of key j when `proportional`), then Turbo's merge on x, then x = x + mlp(ln2(x)).
Merge: t = the current tokens (CLS included); nothing when t < threshold; r = min(r, (t - 1) // 2).
metric = the layer's keys, mean over heads, L2-normalised; a_cls = the CLS query row of the post-softmax
attention, mean over heads. A = tokens 0, 2, ..., B = 1, 3, ...; E[i, j] = cos(A_i, B_j) - alpha * scale *
a_cls[A_i]; CLS's row is -inf. Each A token's best B is argmax_j E; the r A tokens with the largest max_j E
(descending, ties to the earlier) merge into it by size-weighted average. Output: unmerged A tokens in index
order, then all B tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.encoder_tokens import llm_tokens, slot_features, spliced_last_logits
from reference.tome import bipartite
from reference.vision import attention, embed, feature_layer, layers


def turbo_merge(x: Tensor, keys: Tensor, a_cls: Tensor, size: Tensor, members: list[list[int]], r: int,
                weight: float, threshold: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """ToMe's merge (reference/tome.py, CLS never merged) with each A row's score lowered by weight * a_cls."""
    if x.shape[0] < threshold:
        return x, size, members
    return bipartite(x, keys, size, members, r, cls=True, penalty=weight * a_cls)


def encode(model: LlavaForConditionalGeneration, image: Tensor, r: int, alpha: float, scale: float, threshold: int,
           proportional: bool) -> tuple[Tensor, list[list[int]]]:
    """Turbo through LLaVA's feature layer for one image [3, H, W]: the rows [T', C] in the code's order and each
    row's original encoder positions."""
    x = embed(model, image)
    size = torch.ones(x.shape[0])
    members = [[i] for i in range(x.shape[0])]
    for layer in list(layers(model))[: feature_layer(model) + 1]:
        bias = size.log() if proportional else None
        out, keys, probabilities = attention(layer.self_attn, layer.layer_norm1(x), bias)
        x = x + out
        a_cls = probabilities[:, 0, :].mean(0)
        x, size, members = turbo_merge(x, keys, a_cls, size, members, r, alpha * scale, threshold)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, members


@torch.no_grad()
def turbo_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, r: int, alpha: float = 5,
                         scale: float = 100, threshold: int = 40, proportional: bool = False) -> tuple[Tensor, Tensor]:
    """Projected image features [I, N, D] (zeros in empty slots) and the filled slots [I, N] bool."""
    pairs = [slot_features(model, *encode(model, image, r, alpha, scale, threshold, proportional))
             for image in pixel_values]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@torch.no_grad()
def turbo_last_logits(model: LlavaForConditionalGeneration, inputs: dict[str, Tensor], r: int, order: str,
                      alpha: float = 5, scale: float = 100, threshold: int = 40) -> Tensor:
    """The LLM's last logits [B, V] on each prompt row (one image each) with Turbo's tokens in `order`."""
    images = [llm_tokens(model, *encode(model, image, r, alpha, scale, threshold, False), order)
              for image in inputs["pixel_values"]]
    return spliced_last_logits(model, inputs, images)


__all__ = ["turbo_image_features", "turbo_last_logits"]
