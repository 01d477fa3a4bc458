"""FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
Models", arXiv:2505.19536; TungChintao/FlowCut), written plainly from the paper and its LLaVA code; shares no
code with policyc. CLIP towers only.

Exact semantics of this reference, one image at a time (eager attention), after each full encoder layer
idx = 0..last_layer while the image has more than `tokens` patches (n of them):
- relation = CLS row of the post-softmax attention, mean over heads, patch columns; semantic = per head
  softmax over all tokens of v_cls . v_j (values, unscaled), mean over heads, patch columns; |v| = L1 norm
  of the head-mean value of each patch; score = (relation / sum + semantic / sum) * |v|.
- flow = score at the first such layer, then 0.5 * flow + 0.5 * score.
- with r = last_layer - idx, when r is even: r > 0 prunes round((n - tokens) / sqrt(r) * (1 - (H / log n)^2))
  (H the entropy of relation / sum; float32, half to even), r == 0 prunes everything above `tokens`; the
  patches keep the top max(n - pruned, tokens) by flow (descending stable sort), in index order.
Each image on its own (the code takes the largest prune count over a batch). Returns the projected features
[I, N, D] and the kept slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import attention, embed, feature_layer, layers, project


@torch.no_grad()
def flowcut_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, tokens: int, last_layer: int,
                           ) -> tuple[Tensor, Tensor]:
    features, filled = [], []
    for image in pixel_values:
        x = embed(model, image)
        positions = list(range(x.shape[0]))  # original position of each row; CLS is 0
        flow = None
        for idx, layer in enumerate(list(layers(model))[: feature_layer(model) + 1]):
            h = layer.layer_norm1(x)
            out, _, probabilities = attention(layer.self_attn, h)
            heads = layer.self_attn.num_heads
            v = layer.self_attn.v_proj(h).view(x.shape[0], heads, -1).transpose(0, 1)  # [H, T, d]
            x = x + out
            x = x + layer.mlp(layer.layer_norm2(x))
            n = x.shape[0] - 1
            if idx > last_layer or n <= tokens:
                continue
            relation = probabilities[:, 0, 1:].mean(0)
            semantic = torch.softmax(torch.stack([v[i, 0] @ v[i].T for i in range(heads)]), dim=-1).mean(0)[1:]
            magnitude = v.mean(0)[1:].abs().sum(-1)
            score = (relation / relation.sum() + semantic / semantic.sum()) * magnitude
            flow = score if flow is None else 0.5 * flow + 0.5 * score
            left = last_layer - idx
            if left % 2:
                continue
            if left:
                p = relation / relation.sum()
                ratio = -(p * torch.log(p)).sum() / torch.log(torch.tensor(n))
                pruned = int(((n - tokens) / left ** 0.5 * (1 - ratio ** 2)).round())
            else:
                pruned = n
            keep = sorted(torch.sort(flow, descending=True, stable=True).indices[: max(n - pruned, tokens)].tolist())
            x = torch.cat([x[:1], x[[1 + k for k in keep]]])
            flow = flow[keep]
            positions = [0, *(positions[1 + k] for k in keep)]
        slots = torch.zeros(embed(model, image).shape[0] - 1, x.shape[-1])
        kept = torch.zeros(slots.shape[0], dtype=torch.bool)
        for row, position in enumerate(positions[1:], start=1):
            slots[position - 1], kept[position - 1] = x[row], True
        projected = project(model, slots)
        features.append(torch.where(kept[:, None], projected, torch.zeros_like(projected)))
        filled.append(kept)
    return torch.stack(features), torch.stack(filled)


__all__ = ["flowcut_image_features"]
