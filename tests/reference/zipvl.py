"""ZipVL v2 as we read the paper (He et al., arXiv:2410.08584; algorithms.md §12.4; no public code exists),
deliberately plain: one sample at a time without its padding, the Llama decoder run by hand with explicit
softmax attention, Python loops for the scores and the mass rule; shares no code with policyc.

Prefill: after each stage layer, every image token still in the sequence gets ZipVL's normalized attention score
(Eq. 7): over the probe rows (`all`: every row in the sequence; `text`: the rows after the first image that are
not image tokens), the attention probability the row pays the token (softmax over every key the row sees, mean
over heads), summed, divided by the number of probe rows that can see the token (rows at or after it). The image
tokens are sorted best first (ties to the earlier token); the kept count p is the smallest whose running sum
reaches tau times the total (Eq. 6), at least 1; tau >= 1, or an all-zero score, keeps them all. Later layers see
only the kept tokens (and every text token), at their original positions.

Decode: greedy. Each layer caches keys (rotated at the token's original position) and values. After generated
token number s (counting the tokens fed back, the first one being the prefill's answer) has gone through a layer,
if s is a multiple of `every`, the layer scores its last `every` cache entries by the new token's query: per
query head softmax(q . k * scale) over those entries only, mean over heads; it keeps the entries holding `mass`
of that (the same rule as above) and deletes the others from its cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastv import prompt_embeddings


@dataclass
class Layer:
    keys: Tensor  # [Hkv, S, d] rotated at their token's position
    values: Tensor  # [Hkv, S, d]
    tokens: list[int]  # the token index each cache entry holds


@dataclass
class Row:
    tokens: list[int]  # generated tokens
    logits: list[Tensor]  # [V] per step
    kept: list[list[int]]  # per stage layer, the image tokens it kept (indices into the unpadded row)
    caches: list[Layer]


def mass_count(scores: list[float], tau: float) -> int:
    """The fewest of `scores` (best first) whose sum reaches tau of their total; see the module docstring."""
    ordered = sorted(scores, reverse=True)
    if tau >= 1:
        return len(ordered)
    running = 0.0
    totals = []
    for value in ordered:
        running += value
        totals.append(running)
    total = totals[-1] if totals else 0.0
    if total <= 0:
        return len(ordered)
    for count, value in enumerate(totals, start=1):
        if value >= tau * total:
            return count
    return len(ordered)


def best_first(scores: list[float]) -> list[int]:
    """Indices of `scores`, highest first, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _rotate(model: LlavaForConditionalGeneration, x: Tensor, positions: list[int]) -> Tensor:
    """RoPE of x [heads, n, d] at the given positions (rotate-half convention)."""
    lm = model.model.language_model
    cos, sin = lm.rotary_emb(x, position_ids=torch.tensor([positions]))
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _project(model: LlavaForConditionalGeneration, index: int, x: Tensor, positions: list[int]
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Layer `index`'s rotated queries [H, n, d], rotated keys and values [Hkv, n, d] of rows x [n, D]."""
    attn = model.model.language_model.layers[index].self_attn
    h = model.model.language_model.layers[index].input_layernorm(x)
    n, d = x.shape[0], attn.head_dim
    q = attn.q_proj(h).view(n, -1, d).transpose(0, 1)
    k = attn.k_proj(h).view(n, -1, d).transpose(0, 1)
    v = attn.v_proj(h).view(n, -1, d).transpose(0, 1)
    return _rotate(model, q, positions), _rotate(model, k, positions), v


def _finish(model: LlavaForConditionalGeneration, index: int, x: Tensor, probs: Tensor, values: Tensor) -> Tensor:
    """The rest of decoder layer `index`: probs [H, n, S] @ values [Hkv, S, d], o_proj, residual, MLP."""
    layer = model.model.language_model.layers[index]
    groups = probs.shape[0] // values.shape[0]
    out = (probs @ values.repeat_interleave(groups, 0)).transpose(0, 1).reshape(x.shape[0], -1)
    x = x + layer.self_attn.o_proj(out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _normalized_scores(probs: Tensor, rows: list[int], probes: list[int], candidates: list[int]) -> list[float]:
    """ZipVL's Eq. 7 for each candidate row: probs [H, n, n] over the current rows (`rows`: their token indices)."""
    mean = probs.mean(0)
    scores = []
    for j in candidates:
        total, seen_by = 0.0, 0
        for i in probes:
            if rows[i] >= rows[j]:
                total += float(mean[i, j])
                seen_by += 1
        scores.append(total / seen_by if seen_by else 0.0)
    return scores


@torch.no_grad()
def zipvl_row(model: LlavaForConditionalGeneration, embeds: Tensor, image: Tensor, *, layers: list[int], tau: float,
              probe: str, mass: float, every: int, max_new_tokens: int) -> Row:
    """One unpadded sample: embeds [L, D], image [L] bool."""
    lm = model.model.language_model
    length = embeds.shape[0]
    rows = list(range(length))
    first_image = int(image.nonzero()[0, 0])
    x = embeds
    caches: list[Layer] = []
    kept_per_stage: list[list[int]] = []
    for index in range(len(lm.layers)):
        q, k, v = _project(model, index, x, rows)
        groups = q.shape[0] // k.shape[0]
        logits = q @ k.repeat_interleave(groups, 0).transpose(1, 2) * lm.layers[index].self_attn.scaling
        causal = torch.tensor([[rows[j] <= rows[i] for j in range(len(rows))] for i in range(len(rows))])
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        x = _finish(model, index, x, probs, v)
        caches.append(Layer(k, v, list(rows)))
        if index in layers:
            candidates = [i for i, t in enumerate(rows) if image[t]]
            probes = list(range(len(rows))) if probe == "all" else \
                [i for i, t in enumerate(rows) if not image[t] and t > first_image]
            scores = _normalized_scores(probs, rows, probes, candidates)
            count = mass_count(scores, tau)
            chosen = {candidates[i] for i in best_first(scores)[:count]}
            keep = [i for i, t in enumerate(rows) if not image[t] or i in chosen]
            kept_per_stage.append([rows[i] for i in keep if image[rows[i]]])
            x, rows = x[keep], [rows[i] for i in keep]
    result = Row([], [], kept_per_stage, caches)

    def decode_layer(index: int, x: Tensor, position: int, step: int) -> Tensor:
        cache = caches[index]
        q, k, v = _project(model, index, x, [position])
        cache.keys, cache.values = torch.cat([cache.keys, k], 1), torch.cat([cache.values, v], 1)
        cache.tokens.append(position)
        groups = q.shape[0] // k.shape[0]
        keys = cache.keys.repeat_interleave(groups, 0)
        probs = torch.softmax(q @ keys.transpose(1, 2) * lm.layers[index].self_attn.scaling, dim=-1)
        x = _finish(model, index, x, probs, cache.values)
        if (step + 1) % every == 0:
            _recompress(cache, q, keys, lm.layers[index].self_attn.scaling, every, mass)
        return x

    decode_greedily(model, x, length, max_new_tokens, result.tokens, result.logits, decode_layer)
    return result


def decode_greedily(model: LlavaForConditionalGeneration, x: Tensor, length: int, max_new_tokens: int,
                    tokens: list[int], logits_out: list[Tensor],
                    decode_layer: Callable[[int, Tensor, int, int], Tensor]) -> None:
    """Greedy decoding from the prompt's last hidden state x[-1] ([L', D]): each step appends its logits and token,
    embeds the token and runs every layer as `decode_layer(index, x, position, step)` (position: length + step)."""
    lm = model.model.language_model
    logits = model.lm_head(lm.norm(x[-1]))
    for step in range(max_new_tokens):
        logits_out.append(logits)
        token = int(logits.argmax())
        tokens.append(token)
        if step == max_new_tokens - 1:
            break
        x = model.get_input_embeddings()(torch.tensor([token])).to(x.dtype)
        for index in range(len(lm.layers)):
            x = decode_layer(index, x, length + step, step)
        logits = model.lm_head(lm.norm(x[-1]))


def _recompress(cache: Layer, query: Tensor, keys: Tensor, scaling: float, every: int, mass: float) -> None:
    """Keep the last `every` entries holding `mass` of the newest query's attention over them; drop the others."""
    size = len(cache.tokens)
    window = list(range(size - every, size))
    heads = query.shape[0]
    attention = [0.0] * every
    for h in range(heads):
        logits = [float(query[h, 0] @ keys[h, s]) * scaling for s in window]
        top = max(logits)
        weights = [math.exp(value - top) for value in logits]
        for i, weight in enumerate(weights):
            attention[i] += weight / sum(weights) / heads
    count = mass_count(attention, mass)
    chosen = {window[i] for i in best_first(attention)[:count]}
    keep = [s for s in range(size) if s < size - every or s in chosen]
    cache.keys, cache.values = cache.keys[:, keep], cache.values[:, keep]
    cache.tokens = [cache.tokens[s] for s in keep]


def zipvl_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                   pixel_values: Tensor, **options: object) -> list[Row]:
    """Each row alone, its (left) padding removed; options as `zipvl_row`."""
    embeds, _ = prompt_embeddings(model, input_ids, pixel_values)
    image = input_ids == model.config.image_token_id
    rows = []
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        rows.append(zipvl_row(model, embeds[b, real], image[b, real], **options))  # type: ignore[arg-type]
    return rows
