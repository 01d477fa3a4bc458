"""VTC-CLS (Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs",
arXiv:2412.05819; THU-MIG/VTC-CLS), written plainly from the paper and its code; shares no code with policyc.
CLIP towers only.

Exact semantics of this reference, one image at a time (eager attention): for every encoder layer from
`start` (0-based) to LLaVA's feature layer, the CLS row of the post-softmax attention, mean over heads,
patch columns; their sum; the `tokens` patches with the highest sum by a descending stable sort, kept in
their slots. Returns the projected features [I, N, D] and the kept slots [I, N].
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastervlm import cls_attention_rows, keep_slots, top_patches


@torch.no_grad()
def vtc_cls_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, tokens: int, start: int,
                           ) -> tuple[Tensor, Tensor]:
    features, filled = [], []
    for image in pixel_values:
        patches, rows = cls_attention_rows(model, image)
        score = torch.stack(rows[start:]).sum(0)
        out, mask = keep_slots(model, patches, top_patches(score, tokens))
        features.append(out)
        filled.append(mask)
    return torch.stack(features), torch.stack(filled)


__all__ = ["vtc_cls_image_features"]
