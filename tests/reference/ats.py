"""ATS (Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers", ECCV'22, arXiv:2111.15667;
adaptivetokensampling/ATS `ats_block.py`) in a LLaVA CLIP tower, written plainly from algorithms-more.md §6; shares
no code with policyc.

One image at a time, every encoder layer up to LLaVA's feature layer: x = x + attn(ln1(x)); in the ATS layers
then, over the current tokens (CLS first):
  S_j = (sum over heads of the CLS row's attention to j) * ||v_j||_2 (the value projection, heads concatenated),
  for the patches j; S = S / sum(S);
  sort S ascending (ties: the earlier patch first); cdf = cumsum; c = (cdf - min) / (max - min);
  y_t = y0 + t * (1 - y0) / (n - 1), t = 0..n-1, n = the image's patches at the input, y0 = the smallest non-zero c;
  each y_t picks the first sorted patch with the smallest |y_t - c_j|; the distinct picks stay, at most `cap`
  of them (the most significant: largest sorted index); CLS always stays; the rows keep their order.
then x = x + mlp(ln2(x)).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.encoder_tokens import llm_tokens, slot_features, spliced_last_logits
from reference.vision import attention, embed, feature_layer, layers


def sampled_patches(significance: Tensor, samples: int, cap: int) -> list[int]:
    """Indices into `significance` [m] (the patches) that ATS's inverse-transform sampling keeps."""
    order = sorted(range(len(significance)), key=lambda j: (float(significance[j]), j))
    cdf = torch.cumsum(significance[order].double(), 0)
    levels = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    y0 = min(float(c) for c in levels if float(c) != 0)
    picked: set[int] = set()
    for t in range(samples):
        y = y0 + t * (1 - y0) / (samples - 1)
        picked.add(int(torch.argmin((levels - y).abs())))  # the first nearest
    best_first = sorted(picked, reverse=True)[:cap]
    return [order[i] for i in best_first]


def encode(model: LlavaForConditionalGeneration, image: Tensor, ats_layers: range, share: int,
           ) -> tuple[Tensor, list[list[int]]]:
    """ATS through LLaVA's feature layer for one image [3, H, W]: the rows [T', C] and their original positions."""
    x = embed(model, image)
    positions = list(range(x.shape[0]))
    samples = x.shape[0] - 1
    for index, layer in enumerate(list(layers(model))[: feature_layer(model) + 1]):
        h = layer.layer_norm1(x)
        out, _, probabilities = attention(layer.self_attn, h)
        x = x + out
        if index in ats_layers:
            values = layer.self_attn.v_proj(h)  # [T, C]: every head's value vector, concatenated
            score = (probabilities[:, 0, :].sum(0) * values.norm(dim=-1))[1:]
            score = score / score.sum()
            patches = len(positions) - 1
            kept = sampled_patches(score, samples, patches * share // 100)
            rows = [0, *sorted(1 + j for j in kept)]
            x, positions = x[rows], [positions[row] for row in rows]
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, [[p] for p in positions]


@torch.no_grad()
def ats_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, ats_layers: range,
                       share: int = 100) -> tuple[Tensor, Tensor]:
    """Projected image features [I, N, D] (zeros in empty slots) and the filled slots [I, N] bool; `share`: the
    cap, a percentage of the current patches."""
    pairs = [slot_features(model, *encode(model, image, ats_layers, share)) for image in pixel_values]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@torch.no_grad()
def ats_last_logits(model: LlavaForConditionalGeneration, inputs: dict[str, Tensor], ats_layers: range,
                    share: int = 100) -> Tensor:
    """The LLM's last logits [B, V] on each prompt row (one image each) with ATS's tokens in raster order."""
    images = [llm_tokens(model, *encode(model, image, ats_layers, share), "spatial")
              for image in inputs["pixel_values"]]
    return spliced_last_logits(model, inputs, images)


__all__ = ["ats_image_features", "ats_last_logits", "sampled_patches"]
