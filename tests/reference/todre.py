"""ToDRE (Li et al., arXiv:2505.18757 v2; no public code), both stages as the paper's text gives them, written
plainly; shares no code with policyc.

Stage 1 (diversity, before the LLM): greedy max-sum (or k-center) diversification of each image's projected
features, seeded with the most isolated token (tests/reference/divprune.py); the LLM sees a prompt holding only
the kept image tokens, at position ids 0..L'-1 over its real tokens.

Stage 2 (task relevance, Eq. 8), after decoder layer `layer` (the check layer, 0-based), per row: A is that
layer's post-softmax attention averaged over heads ([L, L]); T the real tokens after the first image token that
are no image tokens, V the image tokens;
    a_tv = sum_{i in T, j in V} A_ij / sum_{i in T, all j} A_ij
    a_vt = sum_{i in V, j in T} A_ij / sum_{i in V, all j} A_ij
(0 when T, resp. V, is empty). When a_tv < tau and a_vt < tau every image token is dropped from the later layers;
otherwise none is. Positions are kept (tests/reference/llm_stage.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.divprune import divprune_keep
from reference.llm_stage import Pick, llava_llm_inputs, llm_stage_generate


class Prompt(NamedTuple):
    """What the LLM sees of one row: embeddings [L', D], image flags [L'], positions in the row's input_ids [L']."""

    embeds: Tensor
    image: Tensor
    index: Tensor


def relevance_shares(probs: Tensor, valid: Tensor, image: Tensor) -> tuple[float, float]:
    """(a_tv, a_vt) of one row from its check layer's attention probs [H, L, L]."""
    attention = probs.mean(0)
    positions = torch.arange(image.shape[0])
    first_image = int(image.nonzero()[0]) if bool(image.any()) else image.shape[0]
    text = valid & ~image & (positions > first_image)
    vision = valid & image

    def share(rows: Tensor, columns: Tensor) -> float:
        total = float(attention[rows].sum())
        return float(attention[rows][:, columns].sum()) / total if total > 0 else 0.0
    return share(text, vision), share(vision, text)


def relevance_pick(tau: float) -> Pick:
    """ToDRE's stage 2 as a `pick`: every image token, or none when both shares are below `tau`."""
    def pick(_row: int, _hidden: Tensor, probs: Tensor, valid: Tensor, image: Tensor) -> Tensor:
        a_tv, a_vt = relevance_shares(probs, valid, image)
        everything = (image & valid).nonzero().flatten()
        return everything[:0] if a_tv < tau and a_vt < tau else everything
    return pick


@torch.no_grad()
def stage_one(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
              *, ratio: int | None, objective: str) -> tuple[LlavaForConditionalGeneration, list[Prompt]]:
    """An eager copy of `model` and, per row, the prompt its LLM sees after stage 1 (`ratio=None`: no stage 1):
    embeddings [L', D], image flags [L'] and each row's position in `input_ids` [L'] (real tokens only)."""
    ref, embeds, valid, image = llava_llm_inputs(model, input_ids, attention_mask, pixel_values)
    prompts = []
    for b in range(input_ids.shape[0]):
        rows = valid[b].clone()
        if ratio is not None:  # the row's image features, diversified
            features = embeds[b][image[b]]
            chosen = divprune_keep(features[None], features.shape[0] * ratio // 100, objective)[0]
            rows[image[b].nonzero().flatten()[~chosen]] = False
        index = rows.nonzero().flatten()
        prompts.append(Prompt(embeds[b][index], image[b][index], index))
    return ref, prompts


@torch.no_grad()
def todre_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                   pixel_values: Tensor, *, ratio: int | None, objective: str, tau: float, layer: int,
                   max_new_tokens: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy ToDRE decoding, one image per row: tokens [B, T], per row the image positions of `input_ids` that
    reach the layers after `layer` (ascending), logits [B, T, V]. `ratio=None` skips stage 1 (stage 2 alone)."""
    ref, prompts = stage_one(model, input_ids, attention_mask, pixel_values, ratio=ratio, objective=objective)
    tokens, kept, logits = [], [], []
    for prompt in prompts:
        row_tokens, row_kept, row_logits = llm_stage_generate(
            ref, prompt.embeds[None], torch.ones(1, len(prompt.index), dtype=torch.bool), prompt.image[None],
            layer=layer, pick=relevance_pick(tau), max_new_tokens=max_new_tokens)
        tokens.append(row_tokens[0])
        kept.append(prompt.index[row_kept[0]])
        logits.append(row_logits[0])
    return torch.stack(tokens), kept, torch.stack(logits)


__all__ = ["Prompt", "relevance_pick", "relevance_shares", "stage_one", "todre_generate"]
