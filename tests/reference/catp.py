"""CATP's Stage 1 (Li et al., "CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced Multimodal
In-Context Learning", AAAI'26, arXiv:2508.07871, "Method", Stage 1), written plainly from the paper (no code is
public); shares no code with policyc.

Per image i with projected tokens X_i (S_i of them) and paired text T_i (the text tokens after the image's run in
its prompt row, up to the next image or the row's end, padding left out):

    v̄_i    = mean of the LLM input embeddings of T_i
    ŝim    = cosine similarity mapped to [0, 1]: (cos + 1) / 2 ("shift") or max(cos, 0) ("clamp")
    F(Y)   = Σ_{x ∈ X_i} max_{y ∈ Y} ŝim(y, x) + λ1 · Σ_{y ∈ Y} ŝim(y, v̄_i)     (max over an empty Y is 0)
    Y_i    = greedy: add the token with the largest F(Y + {y}) - F(Y), the earlier one on ties,
             until |Y| = floor(S_i · keep)      (keep = 1 - R/2 in the paper)

An image with no paired text has no alignment term. Cosines use vectors divided by max(their norm, 1e-8), in
float64. Gains within 1e-9 of each other are ties (two tokens that cover each other tie exactly under a symmetric
similarity): the earlier token wins.
Returns the kept slots [I, S] (images numbered along the rows) and the projected features [I, S, D].
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference.mmtok import question_words


def _unit(row: Tensor) -> Tensor:
    return row.double() / max(float(row.double().norm()), 1e-8)


def _rescale(cosine: float, rescale: str) -> float:
    return (cosine + 1) / 2 if rescale == "shift" else max(cosine, 0.0)


TIE = 1e-9  # gains this close count as equal: the earlier token wins (exact ties must not fall to rounding)


def greedy_facility(tokens: Tensor, words: Tensor, count: int, lam: float, rescale: str) -> list[int]:
    """The chosen token indices, in choice order: greedy maximisation of facility location + lam · alignment."""
    x = [_unit(t) for t in tokens]
    n = len(x)
    sim = [[_rescale(float(x[i] @ x[j]), rescale) for j in range(n)] for i in range(n)]
    if words.shape[0]:
        mean = _unit(words.double().mean(0))
        align = [lam * _rescale(float(x[j] @ mean), rescale) for j in range(n)]
    else:
        align = [0.0] * n

    def objective(chosen: list[int]) -> float:
        cover = sum(max((sim[i][j] for j in chosen), default=0.0) for i in range(n))
        return cover + sum(align[j] for j in chosen)

    chosen: list[int] = []
    while len(chosen) < min(count, n):
        base = objective(chosen)
        gains = {j: objective([*chosen, j]) - base for j in range(n) if j not in chosen}
        largest = max(gains.values())
        chosen.append(min(j for j, gain in gains.items() if gain >= largest - TIE))
    return chosen


@torch.no_grad()
def catp_stage1(model: torch.nn.Module, inputs: dict[str, Tensor], keep_percent: float, lam: float = 0.7,
                rescale: str = "shift") -> tuple[Tensor, Tensor]:
    """Kept slots [I, S] and projected features [I, S, D] of CATP's Stage 1 keeping floor(S · keep_percent / 100)."""
    projected = torch.stack(list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    images, n = projected.shape[:2]
    words = question_words(model, inputs["input_ids"], inputs["attention_mask"], images, n)
    count = int(n * keep_percent / 100)
    kept = torch.zeros(images, n, dtype=torch.bool)
    for i in range(images):
        kept[i, greedy_facility(projected[i], words[i], count, lam, rescale)] = True
    return projected, kept



@torch.no_grad()
def kept_logits(model: torch.nn.Module, inputs: dict[str, Tensor], features: Tensor, kept: Tensor) -> Tensor:
    """Last-position logits [B, V] of the unmodified LLM on each prompt, padding removed, whose image runs hold only
    the kept features (one row at a time, images in row order)."""
    image_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    tokens = features.shape[1]
    image, logits = 0, []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
        ids = ids[mask.bool()]
        parts, p = [], 0
        while p < len(ids):
            if int(ids[p]) == image_id:
                parts.append(features[image][kept[image]])
                image, p = image + 1, p + tokens
            else:
                parts.append(embed(ids[p : p + 1]))
                p += 1
        hidden = model.model.language_model(inputs_embeds=torch.cat(parts)[None]).last_hidden_state
        logits.append(model.lm_head(hidden[0, -1]))
    return torch.stack(logits)


__all__ = ["catp_stage1", "greedy_facility", "kept_logits"]
