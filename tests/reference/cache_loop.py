"""A plain greedy decoding loop with an explicit per-head KV cache, for the decode-cache references
(h2o.py, snapkv.py, streamingllm.py, regather.py); shares no code with policyc.

Each sample runs alone, without its padding. The LLaVA model's Llama decoder is run by hand: per
layer, norm, q/k/v projections, then attention over the layer's cache, which holds UN-rotated keys,
values, each key's token index and its rotary position, per key/value head. Keys are rotated at
every step at their rotary position (the token's original position, or with `relative` rotary
positions the key's index in the cache, as StreamingLLM's pos-shift does). Probabilities are an
explicit softmax. Each slot accumulates the attention it receives, summed over the query heads of
its key/value head (H2O's score). Prefill stages (optional) keep or protect image tokens by the
attention the last prompt token pays them (mean over heads), FastV-style, and later layers see only
the kept rows. A policy object decides, after prefill and after every step, which slots each layer keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastv import prompt_embeddings, top_indices
from reference.staged_drop import next_layer_probs


@dataclass
class LayerCache:
    """One layer's cache: [Hkv, S, d] keys (un-rotated) and values; [Hkv, S] token index, rotary position
    and accumulated attention."""

    keys: Tensor
    values: Tensor
    tokens: Tensor
    rope: Tensor
    score: Tensor
    prompt_size: int = 0  # prompt tokens the layer cached in prefill
    prefill_probs: Tensor | None = None  # [H, n, n] the prefill's attention probabilities

    def keep(self, keep: Tensor) -> None:
        """Keep the `keep` slots ([Hkv, S] bool, the same count in every head), in order."""
        count = int(keep[0].sum())
        if not bool((keep.sum(1) == count).all()):
            raise ValueError("every head must keep the same number of slots")
        index = keep.nonzero()[:, 1].view(keep.shape[0], count)
        self.keys = torch.gather(self.keys, 1, index[..., None].expand(-1, -1, self.keys.shape[-1]))
        self.values = torch.gather(self.values, 1, index[..., None].expand(-1, -1, self.values.shape[-1]))
        self.tokens, self.rope, self.score = (torch.gather(t, 1, index) for t in (self.tokens, self.rope, self.score))


class CachePolicy(Protocol):
    relative: bool  # rotary positions are indices in the cache (StreamingLLM)

    def keep(self, layer: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> Tensor:
        """[Hkv, S] bool: the slots that stay. `final`: the prompt tokens that survive the last prefill stage."""


@dataclass
class Stage:
    """After decoder layer `layer`: keep the top `count` image tokens (action "keep") or protect them."""

    layer: int
    count: int
    action: str = "keep"


@dataclass
class Result:
    tokens: Tensor  # [T]
    scores: list[Tensor] = field(default_factory=list)  # logits at each step, [V]
    caches: list[LayerCache] = field(default_factory=list)
    protected: Tensor | None = None  # prompt token indices protected by the prefill


def _rotate(model: LlavaForConditionalGeneration, x: Tensor, positions: Tensor) -> Tensor:
    """RoPE of x [..., S, d] at integer positions [..., S] (rotate-half convention)."""
    lm = model.model.language_model
    cos, sin = lm.rotary_emb(x, position_ids=positions.reshape(1, -1))
    cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def decoder_layer(model: LlavaForConditionalGeneration, index: int, x: Tensor, cache: LayerCache | None,
                  tokens: Tensor, rope: Tensor) -> tuple[Tensor, LayerCache, Tensor]:
    """Decoder layer `index` on new rows x [m, D] (token indices `tokens`, rotary positions `rope`)."""
    layer = model.model.language_model.layers[index]
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    m, d = x.shape[0], attn.head_dim
    q = attn.q_proj(h).view(m, -1, d).transpose(0, 1)  # [H, m, d]
    k = attn.k_proj(h).view(m, -1, d).transpose(0, 1)  # [Hkv, m, d]
    v = attn.v_proj(h).view(m, -1, d).transpose(0, 1)
    heads, kv_heads = q.shape[0], k.shape[0]
    new_tokens, new_rope = tokens.expand(kv_heads, -1), rope.expand(kv_heads, -1)
    if cache is None:
        cache = LayerCache(k, v, new_tokens, new_rope, torch.zeros(kv_heads, m))
    else:
        cache = LayerCache(torch.cat([cache.keys, k], 1), torch.cat([cache.values, v], 1),
                           torch.cat([cache.tokens, new_tokens], 1), torch.cat([cache.rope, new_rope], 1),
                           torch.cat([cache.score, torch.zeros(kv_heads, m)], 1), cache.prompt_size)
    groups = heads // kv_heads
    keys = _rotate(model, cache.keys, cache.rope).repeat_interleave(groups, 0)
    logits = _rotate(model, q, rope.expand(heads, -1)) @ keys.transpose(1, 2) * attn.scaling  # [H, m, S]
    visible = cache.tokens.repeat_interleave(groups, 0)[:, None, :] <= tokens[None, :, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    cache.score = cache.score + probs.sum(1).view(kv_heads, groups, -1).sum(1)
    out = (probs @ cache.values.repeat_interleave(groups, 0)).transpose(0, 1).reshape(m, -1)
    x = x + attn.o_proj(out)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, cache, probs


def _logits(model: LlavaForConditionalGeneration, x: Tensor) -> Tensor:
    return model.lm_head(model.model.language_model.norm(x))


@torch.no_grad()
def generate_row(model: LlavaForConditionalGeneration, embeds: Tensor, image: Tensor, policy: CachePolicy,
                 max_new_tokens: int, stages: list[Stage], compact: bool = False, next_layer: bool = False) -> Result:
    """Greedy decoding of one unpadded sample: embeds [L, D], image [L] bool.

    `compact` (PyramidDrop): layers after a stage number their rows 0..n-1, and a generated token t takes
    position n + t in a layer that processed n prompt rows. `next_layer`: stages score with the next layer's
    norm, q/k projections and RoPE of the stage layer's output (tests/reference/staged_drop.py)."""
    length = embeds.shape[0]
    n_layers = len(model.model.language_model.layers)
    rows = torch.arange(length)
    x, caches = embeds, []
    protected = torch.zeros(0, dtype=torch.long)
    for index in range(n_layers):
        rope = torch.arange(len(rows)) if compact else rows
        x, cache, probs = decoder_layer(model, index, x, None, rows, rope)
        cache.prompt_size, cache.prefill_probs = len(rows), probs
        caches.append(cache)
        for stage in (s for s in stages if s.layer == index):
            candidates = image[rows].nonzero().flatten()
            if next_layer:
                votes = next_layer_probs(model, index, x[None], rope, torch.ones(len(rows), dtype=torch.bool))
                scores = votes.mean(0)[candidates]
            else:
                scores = probs.mean(0)[-1, candidates]  # the last prompt row, mean over heads
            chosen = rows[candidates[top_indices(scores, min(stage.count, len(candidates)))]]
            if stage.action == "protect":
                protected = torch.cat([protected, chosen]).unique()
                continue
            keep = ~image[rows] | torch.isin(rows, chosen) | torch.isin(rows, protected)
            x, rows = x[keep], rows[keep]
    result = Result(torch.zeros(0, dtype=torch.long), [], caches, protected)
    logits = _logits(model, x[-1])
    for index, cache in enumerate(caches):
        _evict(policy, index, cache, True, rows)
    for step in range(max_new_tokens):
        result.scores.append(logits)
        token = int(logits.argmax())
        result.tokens = torch.cat([result.tokens, torch.tensor([token])])
        if step == max_new_tokens - 1:
            break
        x = model.get_input_embeddings()(torch.tensor([token])).to(embeds.dtype)
        position = torch.tensor([length + step])
        for index in range(n_layers):
            rope = torch.tensor([caches[index].keys.shape[1]]) if policy.relative else \
                torch.tensor([caches[index].prompt_size + step]) if compact else position
            x, caches[index], _ = decoder_layer(model, index, x, caches[index], position, rope)
            _evict(policy, index, caches[index], False, rows)
        logits = _logits(model, x[-1])
    return result


def _evict(policy: CachePolicy, index: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> None:
    cache.keep(policy.keep(index, cache, after_prefill, final))
    if policy.relative:  # StreamingLLM's pos-shift: every key sits at its index in the cache
        cache.rope = torch.arange(cache.keys.shape[1]).expand(cache.keys.shape[0], -1)


def cache_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                   pixel_values: Tensor, policy_for_row, max_new_tokens: int,  # type: ignore[no-untyped-def]
                   stages: list[Stage] | None = None, compact: bool = False, next_layer: bool = False) -> list[Result]:
    """Each row alone, its padding removed; `policy_for_row()` makes a fresh policy per row."""
    embeds, _ = prompt_embeddings(model, input_ids, pixel_values)
    image = input_ids == model.config.image_token_id
    results = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        results.append(generate_row(model, embeds[row, real], image[row, real], policy_for_row(), max_new_tokens,
                                    stages or [], compact, next_layer))
    return results


def decode_at_cache_length(model: LlavaForConditionalGeneration, logits: Tensor, caches: list[LayerCache],
                           length: int, steps: int, dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """Greedy decoding from the prompt's last logits [V] where each layer places a new token right after
    the tokens its own cache holds (MustDrop's and SparseVLM v1's per-layer cache length); new token t has
    index `length + t`. Returns the tokens [steps] and the logits of each step."""
    tokens: list[int] = []
    seen: list[Tensor] = []
    for step in range(steps):
        seen.append(logits)
        tokens.append(int(logits.argmax()))
        if step == steps - 1:
            break
        x = model.get_input_embeddings()(torch.tensor([tokens[-1]])).to(dtype)
        for index in range(len(caches)):
            rope = torch.tensor([caches[index].keys.shape[1]])  # the tokens this layer's cache holds
            x, caches[index], _ = decoder_layer(model, index, x, caches[index], torch.tensor([length + step]), rope)
        logits = model.lm_head(model.model.language_model.norm(x[-1]))
    return torch.tensor(tokens, dtype=torch.long), seen
