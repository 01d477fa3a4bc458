"""CoreMatching's token part as its code applies it (wangqinsi1/2025-ICML-CoreMatching, vendored
`LlamaMLP.forward`; algorithms-more.md §5), with exact eviction; shares no code with policyc.

Each sample runs alone, unpadded, through the hand-run decoder of reference/cache_loop.py. In prefill, a hook
on each affected layer's MLP recomputes the SwiGLU intermediate a = act_fn(gate_proj(x)) * up_proj(x); an image
token's score is the number of neurons with a > 0 both for it and for the reference token. The image tokens are
ranked by score; the elbow is the ranked point farthest from the chord joining the first and last (distances
compared in exact integer arithmetic, the first farthest on ties); the core tokens score strictly above it (all
of them when every score is equal). After prefill the layer's cache keeps the text tokens and the core tokens.
With prefill stages (`stages`, FastV-style, reference/cache_loop.py) a later layer ranks the image tokens it still
holds, and the reference is counted among the rows it processed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.cache_loop import LayerCache, Result, Stage, generate_row
from reference.fastv import eager_copy, prompt_embeddings


def elbow_core(scores: list[int]) -> list[bool]:
    """Which scores are core: strictly above the elbow of the scores sorted descending."""
    ranked = sorted(scores, reverse=True)
    count = len(ranked)
    if count < 2 or ranked[0] == ranked[-1]:
        return [True] * count
    rise, run = ranked[-1] - ranked[0], count - 1
    best, elbow = -1, 0
    for i, score in enumerate(ranked):
        distance = abs(rise * i - run * (score - ranked[0]))  # the chord distance times a constant
        if distance > best:
            best, elbow = distance, i
    return [score > ranked[elbow] for score in scores]


class CoreMatching:
    relative = False

    def __init__(self, image: Tensor, layers: list[int], reference: int) -> None:
        self.image, self.layers, self.reference = image, layers, reference
        self.fires: dict[int, Tensor] = {}  # layer -> [L', m] bool: the prefill's firing neurons, per row it held
        self.core: dict[int, Tensor] = {}  # layer -> [L] bool: the prompt tokens its cache keeps after prefill

    def record(self, layer: int, mlp: torch.nn.Module, x: Tensor) -> None:
        """The prefill's MLP input x [L', D] of an affected layer (L': the rows it processed)."""
        self.fires[layer] = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)) > 0

    def keep(self, layer: int, cache: LayerCache, after_prefill: bool, final: Tensor) -> Tensor:
        keep = torch.ones_like(cache.tokens, dtype=torch.bool)
        if not after_prefill or layer not in self.fires:
            return keep
        fires, tokens = self.fires[layer], cache.tokens[0]  # right after prefill: the rows the layer processed
        reference = fires[self.reference]  # counted among those rows
        image = self.image[tokens].nonzero().flatten().tolist()
        scores = [int((fires[i] & reference).sum()) for i in image]
        core = torch.ones(len(self.image), dtype=torch.bool)
        for i, is_core in zip(image, elbow_core(scores), strict=True):
            core[tokens[i]] = is_core
        self.core[layer] = core
        return keep & core[cache.tokens]


def _recorder(policy: CoreMatching, layer: int):  # type: ignore[no-untyped-def]
    def hook(mlp: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if args[0].shape[-2] > 1:  # prefill only
            policy.record(layer, mlp, args[0])
    return hook


@torch.no_grad()
def corematching_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                          pixel_values: Tensor, *, layers: list[int], reference: int, max_new_tokens: int,
                          stages: list[Stage] | None = None) -> tuple[list[Result], list[CoreMatching]]:
    """Greedy decoding of each row alone; returns the results and each row's policy (its core sets)."""
    model = eager_copy(model)
    embeds, _ = prompt_embeddings(model, input_ids, pixel_values)
    image = input_ids == model.config.image_token_id
    results, policies = [], []
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        policy = CoreMatching(image[row, real], layers, reference)
        handles = [model.model.language_model.layers[layer].mlp.register_forward_hook(_recorder(policy, layer))
                   for layer in layers]
        try:
            results.append(generate_row(model, embeds[row, real], image[row, real], policy, max_new_tokens,
                                        stages or []))
        finally:
            for handle in handles:
                handle.remove()
        policies.append(policy)
    return results, policies
