"""MustDrop's LLM stages and output-aware cache (Liu et al., arXiv:2411.10803; liuting20/MustDrop @909afa5,
`modelling_sparse_llama.py` and its attention patch; algorithms.md §4.1 key set, §4.2, §4.3, §4(f));
shares no code with policyc.

Exact semantics of this reference, each sample alone with its padding removed, the Llama decoder run by
hand (tests/reference/cache_loop.py `decoder_layer`: per-layer caches of un-rotated keys, each key with
the rotary position it was computed at):
- Key set: the `key_count` patches the CLS token attends to most in the LAST encoder layer (post-softmax
  CLS row, mean over heads, patch columns; descending stable sort). LLaVA drops CLS, so patch j is the
  image's j-th image token. Key-set tokens are never dropped.
- Prefill: after each pruning layer k, with A = that layer's attention probabilities (softmax over every
  visible key, mean over heads), rows = every text token after the image, columns = the image tokens
  still present: g = A.sum(rows); an image token j is dropped iff g_j < g_thr * sum(g) AND
  max over rows A[:, j] < i_thr (and j is no key token). Later layers see the kept rows at positions
  renumbered 0..n-1 (`position_ids.narrow(1, 0, new_len)`).
- After prefill, the output-aware cache: every layer from the first pruning layer on keeps only the
  prompt tokens that survive the last pruning layer; earlier layers keep everything.
- Decode (greedy): in layer l the new token's rotary position is the number of tokens layer l's cache
  holds (`past_key_value.get_usable_length(kv_len, layer_idx)`); cached keys keep their rotary positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.cache_loop import LayerCache, decode_at_cache_length, decoder_layer
from reference.fastv import eager_copy, prompt_embeddings
from reference.vision import attention, embed, layers


@dataclass
class MustDropResult:
    tokens: Tensor  # [T]
    logits: list[Tensor] = field(default_factory=list)  # [V] per step
    kept: list[Tensor] = field(default_factory=list)  # prompt rows kept after each pruning layer (ascending)
    caches: list[LayerCache] = field(default_factory=list)  # per layer, after decoding
    # per pruning layer: (g / sum(g), max over text rows) of the image tokens present, for choosing thresholds
    scores: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def key_set(model: LlavaForConditionalGeneration, image: Tensor, count: int) -> Tensor:
    """The `count` patches the CLS token attends to most in the last encoder layer, ascending."""
    x = embed(model, image)
    probabilities = None
    for layer in layers(model):
        out, _, probabilities = attention(layer.self_attn, layer.layer_norm1(x))
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
    assert probabilities is not None
    cls_row = probabilities[:, 0, 1:].mean(0)
    return torch.sort(torch.sort(cls_row, descending=True, stable=True).indices[:count]).values


def _row(model: LlavaForConditionalGeneration, embeds: Tensor, image: Tensor, key: Tensor, pruning: list[int],
         g_thr: float, i_thr: float, max_new_tokens: int) -> MustDropResult:
    length = embeds.shape[0]
    n_layers = len(model.model.language_model.layers)
    first_image = int(image.nonzero()[0])
    rows, x = torch.arange(length), embeds
    result = MustDropResult(torch.zeros(0, dtype=torch.long))
    caches: list[LayerCache] = []
    for index in range(n_layers):
        x, cache, probs = decoder_layer(model, index, x, None, rows, torch.arange(len(rows)))
        caches.append(cache)
        if index not in pruning:
            continue
        present = image[rows]
        text = ~present & (rows > first_image)
        block = probs.mean(0)[text][:, present]  # [T, Nv]
        received, strongest = block.sum(0), block.max(0).values
        result.scores.append((received / received.sum(), strongest))
        drop = (received < g_thr * received.sum()) & (strongest < i_thr) & ~torch.isin(rows[present], key)
        keep = torch.ones(len(rows), dtype=torch.bool)
        keep[present.nonzero().flatten()[drop]] = False
        x, rows = x[keep], rows[keep]
        result.kept.append(rows)
    for index, cache in enumerate(caches):  # the output-aware cache
        if index >= min(pruning):
            cache.keep(torch.isin(cache.tokens, rows))
    logits = model.lm_head(model.model.language_model.norm(x[-1]))
    result.tokens, result.logits = decode_at_cache_length(model, logits, caches, length, max_new_tokens, embeds.dtype)
    result.caches = caches
    return result


@torch.no_grad()
def mustdrop_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                      pixel_values: Tensor, *, pruning: list[int], g_thr: float, i_thr: float, key_count: int,
                      max_new_tokens: int) -> list[MustDropResult]:
    """One result per row (one image per row); prompt rows are indices into the row WITHOUT its padding."""
    ref = eager_copy(model)
    embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    image = input_ids == ref.config.image_token_id
    results = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        key = image[row, real].nonzero().flatten()[key_set(ref, pixel_values[row], key_count)]
        results.append(_row(ref, embeds[row, real], image[row, real], key, pruning, g_thr, i_thr, max_new_tokens))
    return results
