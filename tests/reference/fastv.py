"""FastV as its released code does it, for transformers 5.x LLaVA models; shares no code with policyc.

FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764 (pkunlp-icler/FastV).
After LLM decoder layer `layer` (the paper's K - 1), every image token is scored by the attention the
LAST prompt token pays it (post-softmax probabilities of that layer, mean over heads; the released code
uses that one row; `rows="all"` gives the paper's variant: the mean over every real (non-padding) query
row, each row's probabilities being zero for the keys it cannot see). The top `keep` image tokens and every
text token go on; the later layers see only them, at their ORIGINAL position ids.

Exact semantics of this reference:
- keep: an int is a count; a float f in [0, 1] keeps `int(n_image * f)` (truncation, as lmms-eval's
  `int(576 * ratio)`), n_image being the image tokens (input_ids == image_token_id) of that row.
- Selection: a descending *stable* sort of the scores, first `count`: ties go to the lower index. This
  equals `torch.topk(scores, count)` whenever no tie straddles the cut. Kept indices are sorted ascending.
- Positions: a token's position id is its index among the row's non-padding tokens
  (`cumsum(attention_mask) - 1`, HF generate's convention), i.e. its index when there is no padding.
  Generated token t (0-based) has position n_real + t, n_real the row's non-padding prompt length.
- Masks: causal over the kept sequence (kept in increasing position order) with padding keys masked out.
  Only left padding is supported: the last prompt token is the row's last entry.
- Decoding: greedy, NO KV cache. Each step recomputes layers 0..layer on the whole prompt plus the
  generated tokens, and layers after `layer` on the kept prompt tokens plus all generated tokens. The kept
  set is decided once, from the prefill's attention. No EOS stop: exactly max_new_tokens tokens per row.
- Rows are processed one at a time (each with its own padding and its own kept set).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration


def eager_copy(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A deep copy of `model` using eager attention, so every layer materialises its attention probabilities."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def prompt_embeddings(model: LlavaForConditionalGeneration, input_ids: Tensor,
                      pixel_values: Tensor) -> tuple[Tensor, list[int]]:
    """Token embeddings with each image's projected features written over its image tokens, in row-major order.

    Returns the embeddings [B, L, D] and the number of feature tokens of each image, in order.
    """
    embeds = model.get_input_embeddings()(input_ids).clone()
    per_image = list(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    features = torch.cat(per_image).to(embeds.dtype)
    is_image = input_ids == model.config.image_token_id
    if int(is_image.sum()) != features.shape[0]:
        raise ValueError(f"{int(is_image.sum())} image tokens but {features.shape[0]} image features")
    embeds[is_image] = features
    return embeds, [f.shape[0] for f in per_image]


def position_ids(valid: Tensor) -> Tensor:
    """Index of each token among the non-padding ones (padding gets 0), as HF generate computes it."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def keep_count(keep: int | float, n_image: int) -> int:
    """An int is a count; a float is a fraction, truncated: `int(n_image * keep)`."""
    count = keep if isinstance(keep, int) else int(n_image * keep)
    if isinstance(keep, bool) or not 0 <= count <= n_image or (isinstance(keep, float) and not 0 <= keep <= 1):
        raise ValueError(f"cannot keep {keep!r} of {n_image} image tokens")
    return count


def top_indices(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` highest scores, ties to the lower index, returned in ascending order."""
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return torch.sort(order).values


def _causal_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive [1, 1, n, n] mask: query i sees key j iff j <= i and key j is not padding."""
    n = valid.shape[0]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool, device=valid.device)) & valid.bool()[None, :]
    mask = torch.zeros(n, n, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def run_layers(model: LlavaForConditionalGeneration, layers: range, hidden: Tensor, positions: Tensor,
               valid: Tensor) -> tuple[Tensor, Tensor | None]:
    """Run LLM decoder layers `layers` on one sequence hidden [1, n, D] at position ids `positions` [n].

    Returns the hidden states and the attention probabilities [1, H, n, n] of the last layer run.
    """
    lm = model.get_decoder()  # LLaVA's language_model; Idefics3's text_model (fastv_idefics3.py)
    cos_sin = lm.rotary_emb(hidden, position_ids=positions[None])
    mask = _causal_mask(valid, hidden.dtype)
    seen: list[Tensor] = []  # attention probabilities, one per layer run (eager attention returns them)
    for i in layers:
        handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _args, out: seen.append(out[1]))
        try:
            hidden = lm.layers[i](hidden, attention_mask=mask, position_ids=positions[None],
                                  position_embeddings=cos_sin)
        finally:
            handle.remove()
    return hidden, (seen[-1] if seen else None)


def _fastv_row(model: LlavaForConditionalGeneration, embeds: Tensor, valid: Tensor, image: Tensor, layer: int,
               keep: int | float, max_new_tokens: int, rows: str = "last",
               pick: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """FastV greedy decoding of one row: embeds [L, D], valid and image [L] booleans. `pick(scores)` ([L] scores
    -> kept image positions) replaces FastV's top `keep` of the image tokens."""
    lm = model.get_decoder()  # LLaVA's language_model; Idefics3's text_model (fastv_idefics3.py)
    length, device = embeds.shape[0], embeds.device
    if not bool(valid[-1]):
        raise ValueError("only left padding is supported: the last prompt token must not be padding")
    prompt_positions = position_ids(valid)
    n_real = int(valid.sum())
    image_idx = image.nonzero().flatten()
    count = keep_count(keep, len(image_idx))
    text_idx = (~image).nonzero().flatten()
    # Prefill: the attention of layer `layer`, mean over heads, the row of the last prompt token (index
    # length - 1) or (paper) the mean of all real rows.
    _, probs = run_layers(model, range(layer + 1), embeds[None], prompt_positions, valid)
    heads_mean = probs[0].mean(dim=0)  # [L, L]
    scores = heads_mean[length - 1] if rows == "last" else heads_mean[valid].mean(dim=0)
    kept = image_idx[top_indices(scores[image_idx], count)] if pick is None else pick(scores)
    prompt_rows = torch.sort(torch.cat([text_idx, kept])).values
    generated: list[int] = []
    for t in range(max_new_tokens):  # the kept set stays the prefill's
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long, device=device))
        hidden = torch.cat([embeds, new.to(embeds.dtype)])[None]
        positions = torch.cat([prompt_positions, n_real + torch.arange(t, device=device)])
        ok = torch.cat([valid, torch.ones(t, dtype=torch.bool, device=device)])
        hidden, _ = run_layers(model, range(layer + 1), hidden, positions, ok)
        rows = torch.cat([prompt_rows, torch.arange(length, length + t, device=device)])
        hidden, _ = run_layers(model, range(layer + 1, len(lm.layers)), hidden[:, rows], positions[rows], ok[rows])
        logits = model.lm_head(lm.norm(hidden[0, -1]))
        generated.append(int(logits.argmax()))
    return torch.tensor(generated, dtype=torch.long, device=device), kept


@torch.no_grad()
def fastv_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                   pixel_values: Tensor, *, layer: int, keep: int | float,
                   max_new_tokens: int, rows: str = "last", candidates: Tensor | None = None,
                   pick: Callable[[int, Tensor], Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation (arXiv:2403.06764, released-code variant; rows="all": the paper's); see the
    module docstring. `candidates` ([B, L] bool): the image tokens FastV ranks and drops, the others kept like
    text (default: every image token). `pick(row, scores)`: the row's kept image positions from its scores [L]
    (default: the top `keep`).

    Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token indices into that row
    of `input_ids` (padding included), ascending.
    """
    ref = eager_copy(model)
    n_layers = len(ref.get_decoder().layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} outside 0..{n_layers - 1}")
    embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    image = input_ids == ref.config.image_token_id if candidates is None else candidates
    tokens, kept = [], []
    for b in range(input_ids.shape[0]):
        row_pick = None if pick is None else (lambda scores, b=b: pick(b, scores))
        row_tokens, row_kept = _fastv_row(ref, embeds[b], attention_mask[b].bool(), image[b], layer, keep,
                                          max_new_tokens, rows, row_pick)
        tokens.append(row_tokens)
        kept.append(row_kept)
    return torch.stack(tokens), kept


__all__ = ["fastv_generate"]
