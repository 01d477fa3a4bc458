"""Token dropping on Qwen2-VL and Qwen2.5-VL (M-RoPE), written plainly; shares no code with policyc.

- FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764), as its released code
  does it: after LLM decoder layer `layer`, every image token is scored by the attention the LAST prompt
  token pays it (post-softmax probabilities of that layer, mean over heads); the top `keep` image tokens and
  every text token go on, at their ORIGINAL position ids.
- Dropping before the LLM (`projector_mrope_generate`): a selection function picks, per image, tokens of its
  merged features; the LLM sees the text and the kept image tokens only, each at its ORIGINAL position.

M-RoPE positions (Qwen2-VL, arXiv:2409.12191 §2.1), computed here from the grids, one row at a time without
its padding: a text token has (p, p, p), p one past the previous token's largest coordinate; an image of
h x w merged tokens (grid_thw / 2 in height and width) starting at s has (s, s + i, s + j) for its token in
merged row i, column j, in row-major order. Generated token t has (m + 1 + t) x 3, m the prompt's largest
coordinate.

Decoding: greedy, NO KV cache. FastV: each step recomputes layers 0..layer on the whole row plus the
generated tokens, and later layers on the text, kept image tokens and generated tokens; before the LLM: every
layer on the text, kept image and generated tokens. The kept set is the prefill's. Exactly max_new_tokens
tokens per row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn


def mrope_positions(input_ids: Tensor, image_token_id: int, grids: list[tuple[int, int]], merge: int) -> Tensor:
    """[3, L] (time, height, width) positions of one unpadded row `input_ids` [L] whose image runs have the
    patch grids `grids` ((rows, columns) each, before the `merge` x `merge` merger), in order."""
    positions: list[list[int]] = []
    images = iter(grids)
    index, next_free, length = 0, 0, input_ids.shape[0]
    while index < length:
        if int(input_ids[index]) != image_token_id:
            positions.append([next_free] * 3)
            next_free += 1
            index += 1
            continue
        rows, cols = next(images)
        rows, cols = rows // merge, cols // merge
        start = next_free
        for i in range(rows):
            for j in range(cols):
                positions.append([start, start + i, start + j])
        next_free = max(start + rows - 1, start + cols - 1) + 1
        index += rows * cols
    return torch.tensor(positions, dtype=torch.long).T


def _run_layers(model: nn.Module, layers: range, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor | None]:
    """LLM layers `layers` on one causal sequence hidden [1, n, D] at M-RoPE positions [3, n]; returns the
    hidden states and the last layer's attention probabilities [1, H, n, n]."""
    lm = model.model.language_model
    cos_sin = lm.rotary_emb(hidden, positions[:, None, :])
    n = hidden.shape[1]
    mask = torch.zeros(n, n, dtype=hidden.dtype).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                              torch.finfo(hidden.dtype).min)[None, None]
    seen: list[Tensor] = []
    for i in layers:
        handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
        try:
            hidden = lm.layers[i](hidden, attention_mask=mask, position_embeddings=cos_sin)
        finally:
            handle.remove()
    return hidden, (seen[-1] if seen else None)


def _rows(model: nn.Module, inputs: dict[str, Tensor]):  # type: ignore[no-untyped-def]
    """Per prompt row, without its padding: (row ids, padding count, embeddings [L, D] with the image features
    written over the image tokens, image mask [L], M-RoPE positions [3, L], each image's features [n_i, D])."""
    config = model.config
    merge = config.vision_config.spatial_merge_size
    per_image = list(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    grids = [(int(h), int(w)) for _, h, w in inputs["image_grid_thw"]]
    cursor = 0
    for ids, valid in zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True):
        row = ids[valid]
        image = row == config.image_token_id
        runs = int((torch.diff(image.long(), prepend=torch.zeros(1, dtype=torch.long)) == 1).sum())
        features = per_image[cursor:cursor + runs]
        embeds = model.get_input_embeddings()(row).clone()
        embeds[image] = torch.cat(features).to(embeds.dtype)
        positions = mrope_positions(row, config.image_token_id, grids[cursor:cursor + runs], merge)
        cursor += runs
        yield row, int((~valid).sum()), embeds, image, positions, features


def _decode(model: nn.Module, embeds: Tensor, positions: Tensor, later: Tensor, split: int, steps: int) -> list[int]:
    """Greedy tokens of one row without a cache: layers before `split` on every prompt row, layers from `split`
    on the prompt rows `later`; generated tokens go everywhere, at (max + 1 + t) x 3."""
    lm = model.model.language_model
    generated: list[int] = []
    top = int(positions.max())
    for t in range(steps):
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
        hidden = torch.cat([embeds, new])[None]
        where = torch.cat([positions, (top + 1 + torch.arange(t))[None].expand(3, -1)], dim=1)
        rows = torch.cat([later, torch.arange(embeds.shape[0], embeds.shape[0] + t)])
        if split > 0:
            hidden, _ = _run_layers(model, range(split), hidden, where)
        hidden, _ = _run_layers(model, range(split, len(lm.layers)), hidden[:, rows], where[:, rows])
        generated.append(int(model.lm_head(lm.norm(hidden[0, -1])).argmax()))
    return generated


def _eager(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


@torch.no_grad()
def fastv_mrope_generate(model: nn.Module, inputs: dict[str, Tensor], *, layer: int, keep: int,
                         max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation on a Qwen2-VL model for a (left-padded) batch of `inputs` as its processor
    gives them. Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token indices into
    that row of `input_ids` (padding included), ascending."""
    ref = _eager(model)
    tokens, kept_rows = [], []
    for _, pad, embeds, image, positions, _ in _rows(ref, inputs):
        _, probs = _run_layers(ref, range(layer + 1), embeds[None], positions)
        scores = probs[0].mean(0)[-1]
        image_idx = image.nonzero().flatten()
        order = torch.sort(scores[image_idx], descending=True, stable=True).indices[:keep]
        kept = image_idx[torch.sort(order).values]
        later = torch.sort(torch.cat([(~image).nonzero().flatten(), kept])).values
        tokens.append(_decode(ref, embeds, positions, later, layer + 1, max_new_tokens))
        kept_rows.append(kept + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows


@torch.no_grad()
def projector_mrope_generate(model: nn.Module, inputs: dict[str, Tensor], select: Callable[[Tensor], Tensor],
                             *, max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy generation where `select(features [n, D]) -> [n] bool` keeps, per image, some of its merged
    tokens before the LLM. Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token
    indices into that row of `input_ids` (padding included), ascending."""
    ref = _eager(model)
    tokens, kept_rows = [], []
    for _, pad, embeds, image, positions, features in _rows(ref, inputs):
        chosen = torch.cat([select(f) for f in features])
        kept = image.nonzero().flatten()[chosen]
        later = torch.sort(torch.cat([(~image).nonzero().flatten(), kept])).values
        tokens.append(_decode(ref, embeds, positions, later, 0, max_new_tokens))
        kept_rows.append(kept + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows
