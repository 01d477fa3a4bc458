"""SparseVLM v1.5 with or without recycling (Zhang et al., arXiv:2410.04417; Gumpest/SparseVLMs
`modelling_sparse_llama.py` and `utils.py::cluster_and_merge`, algorithms.md §9); shares no code with policyc.

Exact semantics of this reference, each sample alone with its padding removed, the Llama decoder run by
hand (tests/reference/cache_loop.py `decoder_layer`: per-layer caches, keys with the rotary position
they were computed at):
- Raters, once, from the LLM's input embeddings h0: V = the image rows, T = the text rows after the image,
  M = softmax(V Tᵀ, over T).mean(over V); raters = the text tokens with M > mean(M).
- After pruning layer k_i: rel = that layer's attention probabilities (softmax over every visible key),
  mean over heads, rater rows, image columns still present, mean over raters; the top `budgets[i]`
  image tokens stay (descending stable sort: ties to the earlier token). Later layers see the kept rows
  at positions renumbered 0..n-1.
- Recycling (`recycle` = P, a whole percentage; None: none): of the n image tokens the layer dropped, the
  floor(P n / 100) + 1 with the highest rel (stable: ties to the earlier token) are clustered by DPC-kNN on
  the layer's output rows into floor(`clusters` m / 100) + 1 clusters (m of them; 10 in the code, floor(m / 10)
  + 1; k = that many neighbours): see `dpc_knn`.
  Each cluster's rows are replaced by their mean, which stays in the row of the cluster's centre (policyc's
  choice: the code inserts the merged tokens after the kept image tokens); the centre's row is kept.
- Decode (greedy): in layer l the new token's rotary position is the number of tokens layer l's cache
  holds (`get_usable_length(layer_idx)`); each layer caches the rows it processed.
"""

from __future__ import annotations

import math
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
    # per pruning layer: {centre prompt row: the prompt rows of its cluster (ascending)}
    clusters: list[dict[int, list[int]]] = field(default_factory=list)


def dpc_knn(x: Tensor, clusters: int, knn: int) -> tuple[list[int], list[int]]:
    """DPC-kNN of the rows of x [m, C], written out: (the centres, best first; each row's centre).

    d(i, j) = |x_i - x_j| / sqrt(C); density(i) = exp(-mean of d^2 over the knn smallest d(i, .), d(i, i) = 0
    included); delta(i) = min d(i, j) over the rows j denser than i (equal density: j denser when j < i), the
    largest d of all when none is; the centres are the `clusters` rows with the largest delta * density (ties to
    the lower row); every row joins the centre nearest to it (ties to the better centre), a centre itself.
    """
    m, channels = x.shape
    d = torch.stack([(x[i] - x).norm(dim=1) for i in range(m)]) / channels**0.5
    density = [math.exp(-float((d[i].sort().values[:knn] ** 2).mean())) for i in range(m)]
    largest = float(d.max())
    delta = []
    for i in range(m):
        denser = [j for j in range(m) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(float(d[i, j]) for j in denser) if denser else largest)
    ranked = sorted(range(m), key=lambda i: -delta[i] * density[i])
    centres = ranked[:clusters]
    owner = []
    for i in range(m):
        best = centres[0]
        for c in centres[1:]:
            if float(d[c, i]) < float(d[best, i]):
                best = c
        owner.append(i if i in centres else best)
    return centres, owner


def raters(embeds: Tensor, image: Tensor) -> Tensor:
    """Rows of the text tokens after the image whose relevance to the image is above the mean."""
    rows = torch.arange(len(image))
    text = rows[~image & (rows > int(image.nonzero()[0]))]
    relevance = torch.softmax(embeds[image] @ embeds[text].T, dim=-1).mean(0)
    return text[relevance > relevance.mean()]


def _row(model: LlavaForConditionalGeneration, embeds: Tensor, image: Tensor, pruning: list[int],
         budgets: list[int], recycle: int | None, clusters: int, max_new_tokens: int) -> SparseVLMResult:
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
        groups: dict[int, list[int]] = {}
        dropped = present[~torch.isin(present, chosen)]
        if recycle and len(dropped):
            scores = relevance[~torch.isin(present, chosen)]
            take = min(len(dropped), math.floor(len(dropped) * recycle / 100) + 1)
            best = dropped[torch.sort(scores, descending=True, stable=True).indices[:take]]
            count = min(take, math.floor(take * clusters / 100) + 1)
            centres, owner = dpc_knn(x[best], count, count)
            layer_output, x = x, x.clone()
            for c in centres:
                members = [i for i in range(take) if owner[i] == c]
                x[best[c]] = torch.stack([layer_output[best[i]] for i in members]).mean(0)
                keep[best[c]] = True
                groups[int(rows[best[c]])] = sorted(int(rows[best[i]]) for i in members)
        result.clusters.append(groups)
        x, rows = x[keep], rows[keep]
        result.kept.append(rows)
    logits = model.lm_head(model.model.language_model.norm(x[-1]))
    result.tokens, result.logits = decode_at_cache_length(model, logits, caches, length, max_new_tokens, embeds.dtype)
    return result


@torch.no_grad()
def sparsevlm_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                       pixel_values: Tensor, *, pruning: list[int], budgets: list[int],
                       max_new_tokens: int, recycle: int | None = None, clusters: int = 10,
                       ) -> list[SparseVLMResult]:
    """One result per row (one image per row); prompt rows are indices into the row WITHOUT its padding."""
    ref = eager_copy(model)
    embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    image = input_ids == ref.config.image_token_id
    results = []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        results.append(_row(ref, embeds[row, real], image[row, real], pruning, budgets, recycle, clusters,
                            max_new_tokens))
    return results
