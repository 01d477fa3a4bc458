"""GTP-ViT (Xu et al., WACV'24; Ackesnal/GTP-ViT `models_v3.py`: MixedAttnMax, Mixed graph, GraphProp, token scale)
in a LLaVA vision tower, written plainly from algorithms-more.md §8; shares no code with policyc.

One image at a time. The graph over the patches (CLS outside it) from the first encoder layer's input x0:
G[i, j] = 1 when i ≠ j are 8-grid neighbours or x0_j is among the k best cosine matches of x0_i; then
G[i, j] / sqrt(d_i d_j), d the row degrees. In every encoder layer up to LLaVA's feature layer:
x = x + attn(ln1(x)) (log(size) added to every logit of key j with token scale), then the score of each patch
row j, max_h A[h, j, j] · max_h Σ_i A[h, i, j]; the P lowest patches (descending stable sort, the last P)
leave, every kept patch k takes x_k += alpha Σ_p G[k, p] x_p and size_k += alpha Σ_p G[k, p] size_p; the rows stay
in their original order; then x = x + mlp(ln2(x)).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.encoder_tokens import llm_tokens, slot_features, spliced_last_logits
from reference.vision import attention, embed, feature_layer, layers


def patch_graph(x0: Tensor, side: int, neighbours: int, kind: str) -> Tensor:
    """The normalised graph [P, P] over the patches x0 [P, C] of a side x side grid."""
    count = x0.shape[0]
    edges = torch.zeros(count, count)
    unit = x0 / x0.norm(dim=-1, keepdim=True)
    for i in range(count):
        if kind in ("spatial", "mixed"):
            for j in range(count):
                if i != j and abs(i // side - j // side) <= 1 and abs(i % side - j % side) <= 1:
                    edges[i, j] = 1.0
        if kind in ("semantic", "mixed"):
            cosine = unit @ unit[i]
            cosine[i] = float("-inf")
            for j in cosine.topk(min(neighbours, count - 1)).indices.tolist():
                edges[i, j] = 1.0
    degree = edges.sum(1)
    normalised = torch.zeros(count, count)
    for i in range(count):
        for j in range(count):
            if edges[i, j] > 0:
                normalised[i, j] = 1.0 / (degree[i] * degree[j]).sqrt()
    return normalised


def encode(model: LlavaForConditionalGeneration, image: Tensor, r: int, alpha: float, kind: str, neighbours: int,
           scale: bool) -> tuple[Tensor, list[list[int]]]:
    """GTP-ViT through LLaVA's feature layer for one image [3, H, W]: the rows [T', C] in position order and each
    row's encoder position (CLS at 0, patch p at p + 1)."""
    x = embed(model, image)
    side = int((x.shape[0] - 1) ** 0.5)
    graph = patch_graph(x[1:], side, neighbours, kind)
    positions = list(range(x.shape[0]))
    size = torch.ones(x.shape[0])
    for layer in list(layers(model))[: feature_layer(model) + 1]:
        out, _, probabilities = attention(layer.self_attn, layer.layer_norm1(x), size.log() if scale else None)
        x = x + out
        score = probabilities.diagonal(dim1=1, dim2=2).amax(0) * probabilities.sum(1).amax(0)  # [T]
        patch_rows = list(range(1, x.shape[0]))
        ranked = sorted(patch_rows, key=lambda row: -float(score[row]))  # Python's sort is stable
        removed = min(r, len(patch_rows) - 1)
        leaving = set(ranked[len(ranked) - removed:])
        kept = [row for row in range(x.shape[0]) if row not in leaving]
        new_x, new_size = [], []
        for k in kept:
            value, weight = x[k].clone(), size[k].clone()
            if k != 0:
                for p in leaving:
                    g = graph[positions[k] - 1, positions[p] - 1]
                    value = value + alpha * g * x[p]
                    weight = weight + alpha * g * size[p]
            new_x.append(value)
            new_size.append(weight)
        x, size, positions = torch.stack(new_x), torch.stack(new_size), [positions[k] for k in kept]
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, [[p] for p in positions]


@torch.no_grad()
def gtp_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, r: int, alpha: float = 0.1,
                       kind: str = "mixed", neighbours: int = 8, scale: bool = True) -> tuple[Tensor, Tensor]:
    """Projected image features [I, N, D] (zeros in empty slots) and the filled slots [I, N] bool."""
    pairs = [slot_features(model, *encode(model, image, r, alpha, kind, neighbours, scale)) for image in pixel_values]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@torch.no_grad()
def gtp_last_logits(model: LlavaForConditionalGeneration, inputs: dict[str, Tensor], r: int, alpha: float = 0.1,
                    kind: str = "mixed", neighbours: int = 8, scale: bool = True) -> Tensor:
    """The LLM's last logits [B, V] on each prompt row (one image each) with GTP-ViT's tokens in raster order."""
    images = [llm_tokens(model, *encode(model, image, r, alpha, kind, neighbours, scale), "spatial")
              for image in inputs["pixel_values"]]
    return spliced_last_logits(model, inputs, images)


__all__ = ["gtp_image_features", "gtp_last_logits"]
