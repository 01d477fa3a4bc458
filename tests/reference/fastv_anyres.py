"""FastV on LLaVA-NeXT and LLaVA-OneVision (anyres images, several images, videos); shares no code with policyc.

FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764 (pkunlp-icler/FastV).
The LLMs of both families (Llama, Mistral, Qwen2) use 1-D RoPE and a causal mask, as LLaVA-1.5's, so FastV's
LLM side is exactly tests/reference/fastv.py's (its `_fastv_row`: eager attention, no KV cache, full recompute
each step, kept tokens at their original position ids, ties to the lower index; see that module's docstring).
What anyres changes is the prompt, and this module builds it without the model's forward:

- Each image's features are what the model's own `get_image_features` packs for it (base view, then the crops'
  features unpadded to the image's aspect ratio, each row followed by the `image_newline` feature; OneVision
  interpolates large crops down first, and encodes the base view only when a prompt has several images), written
  over the row's `<image>` placeholders in order, images in batch order. OneVision's videos (`get_video_features`:
  frames pooled 2x2, then one newline feature) go over the `<video>` placeholders the same way.
- The image tokens FastV ranks and drops are all these placeholders: base, crop and newline features alike (they
  share one id; a newline token is dropped when the last token attends to it little), and video tokens.
- A row's image tokens count depends on its images' sizes, so a `keep` share gives rows different counts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference.fastv import _fastv_row, eager_copy


def anyres_embeddings(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Token embeddings [B, L, D] with the images' (and videos') features over their placeholders, and the
    visual mask [B, L] (image and video placeholders)."""
    config = model.config
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids).clone()
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    if "pixel_values" in inputs:
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        per_image = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"], **extra).pooler_output
        visual |= _write(embeds, input_ids == config.image_token_id, torch.cat(list(per_image)))
    if "pixel_values_videos" in inputs:
        videos = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output  # [videos, n, D]
        placeholders = input_ids == config.video_token_id
        if videos.shape[0] * (videos.shape[1] + 1) == int(placeholders.sum()):  # transformers 5.17 appends each
            newline = model.model.image_newline.to(videos.dtype)  # video's newline in forward, not here
            videos = torch.cat([videos, newline.expand(videos.shape[0], 1, -1)], dim=1)
        visual |= _write(embeds, placeholders, videos.flatten(0, 1))
    return embeds, visual


def _write(embeds: Tensor, where: Tensor, features: Tensor) -> Tensor:
    """Write `features` [n, D] over the `where` [B, L] positions of `embeds` in row-major order."""
    if int(where.sum()) != features.shape[0]:
        raise ValueError(f"{int(where.sum())} placeholders but {features.shape[0]} features")
    embeds[where] = features.to(embeds.dtype)
    return where


@torch.no_grad()
def fastv_anyres_generate(model: nn.Module, inputs: dict[str, Tensor], *, layer: int, keep: int | float,
                          max_new_tokens: int, rows: str = "last") -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation on an anyres model's `inputs` (as its processor gives them, left padded).

    Returns the new tokens [B, max_new_tokens] and, per row, the kept visual-token indices into that row of
    `input_ids` (padding included), ascending.
    """
    ref = eager_copy(model)
    count = len(ref.model.language_model.layers)
    if not 0 <= layer < count:
        raise ValueError(f"layer {layer} outside 0..{count - 1}")
    embeds, visual = anyres_embeddings(ref, inputs)
    tokens, kept = [], []
    for b in range(inputs["input_ids"].shape[0]):
        row_tokens, row_kept = _fastv_row(ref, embeds[b], inputs["attention_mask"][b].bool(), visual[b], layer,
                                          keep, max_new_tokens, rows)
        tokens.append(row_tokens)
        kept.append(row_kept)
    return torch.stack(tokens), kept


__all__ = ["anyres_embeddings", "fastv_anyres_generate"]
