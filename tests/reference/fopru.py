"""FoPru (Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models", arXiv:2411.14164),
written plainly from the only implementation found, HydraInfer's `focal_prunning` (not the authors' code);
shares no code with policyc. CLIP and SigLIP towers (a CLS row and column are removed where there is one).

Exact semantics of this reference, one image at a time (eager attention): at LLaVA's feature layer, the full
pre-softmax logits S = q·kᵀ·scale [H, N, N] among the patches, mean over heads; c = S.mean(0) (received),
r = S.mean(1) (given); sig = c if var(c) > var(r) else r (unbiased), or the one `direction` names.
rank: the `count` highest by a descending stable sort (ties: the earlier patch). row: the floor(count / width)
grid rows with the highest sums of sig (stable: the earlier row), all their patches. The kept patches stay in
their slots (raster order). Returns the projected features [I, N, D] (zeros in empty slots) and the kept slots.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastervlm import keep_slots, top_patches
from reference.vision import attention, embed, feature_layer, has_cls, layers


def significance(logits: Tensor, direction: str) -> Tensor:
    """FoPru's significance of the patches from the feature layer's logits [H, N, N]: [N]."""
    scores = logits.mean(0)  # [N, N] mean over heads
    received, given = scores.mean(0), scores.mean(1)
    if direction == "received":
        return received
    if direction == "given":
        return given
    return received if torch.var(received).item() > torch.var(given).item() else given


def focal_rows(sig: Tensor, count: int, width: int) -> list[int]:
    """Every patch of the floor(count / width) grid rows with the highest sums of `sig` [N]."""
    sums = sig.reshape(-1, width).sum(1)  # [R]
    rows = torch.sort(sums, descending=True, stable=True).indices[: count // width]
    return sorted(int(row) * width + x for row in rows.tolist() for x in range(width))


@torch.no_grad()
def fopru_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, count: int,
                         strategy: str = "rank", direction: str = "auto") -> tuple[Tensor, Tensor]:
    first = int(has_cls(model))
    width = int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        for index, layer in enumerate(list(layers(model))[: feature_layer(model) + 1]):
            h = layer.layer_norm1(x)
            if index == feature_layer(model):  # the feature layer's own logits, before its softmax
                attn, tokens = layer.self_attn, h.shape[0]
                q = attn.q_proj(h).view(tokens, attn.num_heads, -1).transpose(0, 1)
                k = attn.k_proj(h).view(tokens, attn.num_heads, -1).transpose(0, 1)
                logits = (q @ k.transpose(-1, -2) * attn.scale)[:, first:, first:]  # CLS row and column out
            out, _, _ = attention(layer.self_attn, h)
            x = x + out
            x = x + layer.mlp(layer.layer_norm2(x))
        patches = x[first:]
        sig = significance(logits, direction)
        kept = top_patches(sig, count) if strategy == "rank" else focal_rows(sig, count, width)
        out, mask = keep_slots(model, patches, kept)
        features.append(out)
        filled.append(mask)
    return torch.stack(features), torch.stack(filled)


__all__ = ["focal_rows", "fopru_image_features", "significance"]
