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



def _cosine_to_mean(hidden: Tensor, rows: list[int], members: list[int]) -> list[float]:
    """cos(h_r, mean of h over `members`) for each r in `rows` (hidden [n, D]; 0 when `members` is empty)."""
    if not members:
        return [0.0] * len(rows)
    mean = hidden[members].double().mean(0)
    mean = mean / max(float(mean.norm()), 1e-8)
    return [float(hidden[r].double() @ mean) / max(float(hidden[r].double().norm()), 1e-8) for r in rows]


def _top(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` highest scores, the earlier on ties."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count])


@torch.no_grad()
def catp_prefill(model: torch.nn.Module, inputs: dict[str, Tensor], kept: float, lam: float = 0.7,
                 rescale: str = "shift", layer: int | None = None, lam2: float = 0.6,
                 kept_llm: float = 100.0) -> tuple[Tensor, Tensor, list[list[int]]]:
    """CATP on each prompt (one row at a time, padding removed; `model` uses eager attention). Stage 1 as
    `catp_stage1`; the LLM reads each image's kept features only, numbered 0..n-1. With `layer` = K, Stage 2:

    after layer K, the context image tokens (of every image but the prompt's last), pooled, keep the
    floor(n_ctx · kept_llm / 100) highest max(0, A^K[t, c] - A^(K-1)[t, c]) + lam2 · cos(h^K_c, mean h^K over the
    query sample), t the last token, A the attention probabilities averaged over heads, h the layer's output, the
    query sample the last image's tokens and every token after them; after layer K + 1 the query image's tokens keep
    floor(n_q · kept_llm / 100) highest cos(h^(K+1)_q, mean h^(K+1) over the surviving context image tokens). A
    prompt with one image skips Stage 2. Ties go to the earlier token; kept tokens keep their positions.

    Returns the stage 1 slots [I, S], the last-position logits [B, V] and, per row, the positions (in the padded
    input_ids row) of the tokens layer K + 2 reads."""
    projected, slots = catp_stage1(model, inputs, kept, lam, rescale)
    lm, embed, image_id = model.model.language_model, model.get_input_embeddings(), model.config.image_token_id
    tokens, image, logits, survivors = projected.shape[1], 0, [], []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
        parts, origin, which = [], [], []  # LLM inputs, their positions in the padded row, their image (-1: text)
        p, images = 0, 0
        while p < len(ids):
            if not mask[p]:
                p += 1
            elif int(ids[p]) == image_id:
                chosen = slots[image].nonzero().flatten().tolist()
                parts.append(projected[image][chosen])
                origin += [p + j for j in chosen]
                which += [images] * len(chosen)
                image, images, p = image + 1, images + 1, p + tokens
            else:
                parts.append(embed(ids[p : p + 1]))
                origin.append(p)
                which.append(-1)
                p += 1
        hidden = torch.cat(parts)[None]  # [1, n, D]
        rows = list(range(hidden.shape[1]))  # the rows still present, as indices into this prompt
        positions = torch.arange(hidden.shape[1])
        if layer is None or images < 2:
            hidden = _layers(lm, range(len(lm.layers)), hidden, positions)[0]
        else:
            hidden, before = _layers(lm, range(layer), hidden, positions)
            hidden, at = _layers(lm, range(layer, layer + 1), hidden, positions)
            query_start = which.index(images - 1)
            context = [r for r in rows if 0 <= which[r] < images - 1]
            sample = [r for r in rows if r >= query_start]
            gain = [max(0.0, float(at[-1, c]) - float(before[-1, c])) for c in context]
            similar = _cosine_to_mean(hidden[0], context, sample)
            scores = [g + lam2 * s for g, s in zip(gain, similar, strict=True)]
            kept_context = [context[i] for i in _top(scores, int(len(context) * kept_llm / 100))]
            rows = [r for r in rows if r not in context or r in kept_context]
            hidden, positions = hidden[:, rows], positions[rows]
            hidden = _layers(lm, range(layer + 1, layer + 2), hidden, positions)[0]
            query = [i for i, r in enumerate(rows) if which[r] == images - 1]
            members = [i for i, r in enumerate(rows) if 0 <= which[r] < images - 1]
            similar = _cosine_to_mean(hidden[0], query, members)
            kept_query = {query[i] for i in _top(similar, int(len(query) * kept_llm / 100))}
            local = [i for i in range(len(rows)) if i not in query or i in kept_query]
            rows, hidden, positions = [rows[i] for i in local], hidden[:, local], positions[local]
            hidden = _layers(lm, range(layer + 2, len(lm.layers)), hidden, positions)[0]
        survivors.append([origin[r] for r in rows])
        logits.append(model.lm_head(lm.norm(hidden[0, -1])))
    return slots, torch.stack(logits), survivors


def _layers(lm: torch.nn.Module, layers: range, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor | None]:
    """Decoder `layers` on one causal sequence hidden [1, n, D] at `positions` [n]; the output and the last layer's
    attention probabilities averaged over heads [n, n] (eager attention returns them)."""
    n = hidden.shape[1]
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
    cos_sin = lm.rotary_emb(hidden, position_ids=positions[None])
    seen: list[Tensor] = []
    for i in layers:
        handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
        try:
            hidden = lm.layers[i](hidden, attention_mask=mask, position_ids=positions[None],
                                  position_embeddings=cos_sin)
        finally:
            handle.remove()
    return hidden, (seen[-1][0].mean(0) if seen else None)


__all__ = ["catp_prefill", "catp_stage1", "greedy_facility"]
