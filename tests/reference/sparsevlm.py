"""SparseVLM v1.5 without recycling (Zhang et al., arXiv:2410.04417; Gumpest/SparseVLMs
`modelling_sparse_llama.py`, algorithms.md §9); shares no code with policyc.

Exact semantics of this reference, each sample alone with its padding removed, the Llama decoder run by
hand (tests/reference/cache_loop.py `decoder_layer`: per-layer caches, keys with the rotary position
they were computed at):
- Raters, once, from the LLM's input embeddings h0: V = the image rows, T = the text rows after the image,
  M = softmax(V Tᵀ, over T).mean(over V); raters = the text tokens with M > mean(M).
- After pruning layer k_i: rel = that layer's attention probabilities (softmax over every visible key),
  mean over heads, rater rows, image columns still present, mean over raters; the top `budgets[i]`
  image tokens stay (descending stable sort: ties to the earlier token). Later layers see the kept rows
  at positions renumbered 0..n-1.
- Decode (greedy): in layer l the new token's rotary position is the number of tokens layer l's cache
  holds (`get_usable_length(layer_idx)`); each layer caches the rows it processed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.cache_loop import LayerCache, decode_at_cache_length, decoder_layer
from reference.fastv import eager_copy, prompt_embeddings, top_indices


@dataclass
class SparseVLMResult:
    tokens: Tensor  # [T]
    raters: Tensor  # prompt rows of the raters (ascending)
    logits: list[Tensor] = field(default_factory=list)  # [V] per step
    kept: list[Tensor] = field(default_factory=list)  # prompt rows kept after each pruning layer (ascending)


def raters(embeds: Tensor, image: Tensor) -> Tensor:
    """Rows of the text tokens after the image whose relevance to the image is above the mean."""
    rows = torch.arange(len(image))
    text = rows[~image & (rows > int(image.nonzero()[0]))]
    relevance = torch.softmax(embeds[image] @ embeds[text].T, dim=-1).mean(0)
    return text[relevance > relevance.mean()]


def _row(model: LlavaForConditionalGeneration, embeds: Tensor, image: Tensor, pruning: list[int],
         budgets: list[int], max_new_tokens: int) -> SparseVLMResult:
    length = embeds.shape[0]
    n_layers = len(model.model.language_model.layers)
    rows, x = torch.arange(length), embeds
    result = SparseVLMResult(torch.zeros(0, dtype=torch.long), raters(embeds, image))
    caches: list[LayerCache] = []
    for index in range(n_layers):
        x, cache, probs = decoder_layer(model, index, x, None, rows, torch.arange(len(rows)))
        caches.append(cache)
        if index not in pruning:
            continue
        present = image[rows].nonzero().flatten()
        relevance = probs.mean(0)[torch.isin(rows, result.raters)][:, present].mean(0)
        chosen = present[top_indices(relevance, min(budgets[pruning.index(index)], len(present)))]
        keep = ~image[rows]
        keep[chosen] = True
        x, rows = x[keep], rows[keep]
        result.kept.append(rows)
    logits = model.lm_head(model.model.language_model.norm(x[-1]))
    result.tokens, result.logits = decode_at_cache_length(model, logits, caches, length, max_new_tokens, embeds.dtype)
    return result


@torch.no_grad()
def sparsevlm_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                       pixel_values: Tensor, *, pruning: list[int], budgets: list[int],
                       max_new_tokens: int) -> list[SparseVLMResult]:
    """One result per row (one image per row); prompt rows are indices into the row WITHOUT its padding."""
    ref = eager_copy(model)
    embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    image = input_ids == ref.config.image_token_id
    results = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        results.append(_row(ref, embeds[row, real], image[row, real], pruning, budgets, max_new_tokens))
    return results
