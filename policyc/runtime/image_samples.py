"""The structure of a vision forward's images that stages before the LLM read: which prompt row (sample) each image
belongs to, for budgets split across a sample's images (`top(allocate=...)`, passes/allocate.py), and the frames
of videos (`merge temporal`, passes/merge_temporal.py). A vision forward encodes the images of a batch in prompt
order, row after row (LLaVA's masked_scatter order, Qwen2-VL's packing, Idefics3's and InternVL's tiles), so image
i belongs to the row whose placeholder tokens hold its tokens."""

from __future__ import annotations

import torch

from policyc.errors import PolicyError


def image_samples(prompt: tuple[torch.Tensor, torch.Tensor] | None, token_ids: tuple[int, ...],
                  sizes: list[int]) -> torch.Tensor:
    """[I] long: the row of `prompt` (input_ids, valid [B, L]) that holds image i's `sizes[i]` placeholders.
    `token_ids` are the placeholder ids the images may use (Qwen2-VL: images or videos, one kind per forward)."""
    if prompt is None:
        raise PolicyError.at("allocate= splits a budget across each prompt's images, but this vision forward came "
                             "without input_ids", None,
                             "call the model or generate() with input_ids (not inputs_embeds, nor "
                             "get_image_features alone)")
    ids, valid = prompt
    total = sum(sizes)
    matching = []
    for token_id in token_ids:
        per_row = ((ids == token_id) & valid).sum(1).cpu()
        if int(per_row.sum()) == total:
            matching.append(per_row)
    if len(matching) != 1:
        found = "no placeholder id" if not matching else "both image and video placeholders"
        raise PolicyError.at(f"allocate= cannot tell which prompt holds which image: {found} of the prompt "
                             f"count(s) the {total} tokens of this vision forward's {len(sizes)} images", None,
                             "give each prompt's images or videos in one vision forward")
    ends = matching[0].cumsum(0)
    starts = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
    rows = torch.searchsorted(ends, starts, right=True)
    last = torch.tensor(sizes, dtype=torch.long) + starts
    if bool((last > ends[rows.clamp(max=len(ends) - 1)]).any()):
        raise PolicyError.at("allocate= found an image whose tokens span two prompts", None)
    return rows


def video_frames(grid_thw: torch.Tensor, patches_per_token: int, valid: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's packed images and videos, padded per image to `valid` [I, N]: each token's frame (group of
    temporal_patch_size frames) and spatial index within it, [I, N] long each, -1 on padding. A video of grid
    (t, h, w) holds t frames of h*w/patches_per_token merged tokens, frame after frame in raster order; an image
    is one frame (t = 1)."""
    positions = torch.arange(valid.shape[1], device=valid.device)[None]
    per_frame = (grid_thw[:, 1:].prod(-1) // patches_per_token).to(valid.device)[:, None]
    return torch.where(valid, positions // per_frame, -1), torch.where(valid, positions % per_frame, -1)
