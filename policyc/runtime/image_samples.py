"""The structure of a vision forward's images that stages before the LLM read: which prompt row (sample) each image
belongs to, for budgets split across a sample's images (`top(allocate=...)`, passes/allocate.py), the frames
of videos (`merge temporal`, passes/merge_temporal.py), and where each forward's kept flags go in the prompt when
images and videos are encoded apart (LLaVA-OneVision). A vision forward encodes the images of a batch in prompt
order, row after row (LLaVA's masked_scatter order, Qwen2-VL's packing, Idefics3's and InternVL's tiles), so image
i belongs to the row whose placeholder tokens hold its tokens."""

from __future__ import annotations

import torch

from policyc.errors import PolicyError


def image_samples(prompt: tuple[torch.Tensor, torch.Tensor] | None, token_ids: tuple[int, ...],
                  sizes: list[int], apart: tuple[int, ...] = ()) -> torch.Tensor:
    """[I] long: the row of `prompt` (input_ids, valid [B, L]) that holds image i's `sizes[i]` placeholders.
    `token_ids` are the placeholder ids the images may use (Qwen2-VL: images or videos, one kind per forward).
    `apart`: placeholder ids encoded in another forward (LLaVA-OneVision's videos beside its images); a prompt
    holding them too fails, since this forward could not number its images among all of the prompt's."""
    if prompt is None:
        raise PolicyError.at("splitting a budget across each prompt's images (allocate=) or picking one of them "
                             "(vision[i], image) needs the prompt, but this vision forward came without input_ids",
                             None, "call the model or generate() with input_ids (not inputs_embeds, nor "
                             "get_image_features alone)")
    ids, valid = prompt
    if apart and bool((torch.isin(ids, torch.tensor(apart, device=ids.device)) & valid).any()):
        raise PolicyError.at("a prompt holds images and videos, which this model encodes in two forwards: before the "
                             "LLM, allocate=, vision[i] and image cannot number a prompt's images and videos together",
                             None, "split the budget or pick the image in an LLM stage, where they are numbered in "
                             "prompt order")
    total = sum(sizes)
    matching = []
    for token_id in token_ids:
        per_row = ((ids == token_id) & valid).sum(1).cpu()
        if int(per_row.sum()) == total:
            matching.append(per_row)
    if len(matching) != 1:
        found = "no placeholder id" if not matching else "both image and video placeholders"
        raise PolicyError.at(f"policyc cannot tell which prompt holds which image: {found} of the prompt "
                             f"count(s) the {total} tokens of this vision forward's {len(sizes)} images", None,
                             "give each prompt's images or videos in one vision forward")
    ends = matching[0].cumsum(0)
    starts = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
    rows = torch.searchsorted(ends, starts, right=True)
    last = torch.tensor(sizes, dtype=torch.long) + starts
    if bool((last > ends[rows.clamp(max=len(ends) - 1)]).any()):
        raise PolicyError.at("policyc found an image whose tokens span two prompts", None)
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


def placeholder_flags(visual_ids: torch.Tensor, kept: torch.Tensor, protected: torch.Tensor | None,
                      by_placeholder: dict[int, tuple[torch.Tensor, torch.Tensor]],
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept and protected flags of a prompt's visual tokens, flat in prompt order (`visual_ids` [n]: the
    placeholder id of each). A prompt holding placeholders of several ids, each encoded in its own forward
    (LLaVA-OneVision's images and videos: `by_placeholder` maps an id to its forward's flags over its tokens in
    order), gets each id's flags at its own positions. Otherwise, or where a forward's count does not match its
    placeholders, the last forward's `kept` and `protected` (the LLM then checks their count)."""
    present = visual_ids.unique().tolist()
    if len(present) < 2 or not set(present) <= by_placeholder.keys():
        return kept, protected
    combined_kept = torch.zeros(visual_ids.shape, dtype=torch.bool, device=visual_ids.device)
    combined_protected = torch.zeros_like(combined_kept)
    for token_id in present:
        where = visual_ids == token_id
        part_kept, part_protected = by_placeholder[token_id]
        if int(where.sum()) != part_kept.numel():
            return kept, protected
        combined_kept[where] = part_kept.flatten().to(visual_ids.device)
        combined_protected[where] = part_protected.flatten().to(visual_ids.device)
    return combined_kept, combined_protected
