"""Token dropping on Qwen3.5's hybrid LLM (Gated DeltaNet and full-attention layers), written plainly; shares no
code with policyc.

- Qwen3.5's LLM: three of every four decoder layers are Gated DeltaNet layers (Yang et al., "Gated Delta Networks",
  arXiv:2412.06464: a causal depthwise conv, then the gated delta-rule recurrence over the rows in order; no
  positions, no attention weights), the fourth full causal attention with M-RoPE. Dropping a token after layer k
  removes its row from every later layer: the later DeltaNet layers run their conv and recurrence over the kept rows
  only (kept tokens become neighbours), the later attention layers attend over them.
- FastV (Chen et al., arXiv:2403.06764), as its released code does it: after decoder layer `layer` (a full-attention
  one: only those have attention), every visual token is scored by the attention the LAST prompt token pays it
  (post-softmax probabilities of that layer, mean over heads); the top `keep` visual tokens and every text token go
  on, at their ORIGINAL M-RoPE positions.
- Dropping before the LLM (`projector_hybrid_generate`): a selection function picks, per image, tokens of its merged
  features; the LLM sees the text and the kept image tokens only, each at its ORIGINAL position.

The layers run one at a time, each on one unpadded row, with the model's own decoder-layer modules: no cache, no
padding mask. M-RoPE positions: `reference.fastv_mrope.mrope_positions` (Qwen3.5 numbers images as Qwen2-VL does;
the tests check them against the model's `get_rope_index`). Decoding: greedy, NO KV cache: every step reruns the
whole sequence (prompt rows as the prefill kept them, plus the generated tokens). Exactly max_new_tokens per row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from reference.fastv_mrope import mrope_positions


def _eager(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def _layer(model: nn.Module, i: int, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor | None]:
    """Decoder layer `i` on one sequence hidden [1, n, D] at M-RoPE positions [3, n]: its output and, for an attention
    layer, its attention probabilities [1, H, n, n] (None for a DeltaNet layer)."""
    lm = model.model.language_model
    layer = lm.layers[i]
    rotary = lm.rotary_emb(hidden, positions[:, None])
    if not hasattr(layer, "self_attn"):  # Gated DeltaNet: conv and recurrence over the rows in order, no mask
        return layer(hidden, position_embeddings=rotary, attention_mask=None), None
    n = hidden.shape[1]
    mask = torch.zeros(n, n, dtype=hidden.dtype).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                              torch.finfo(hidden.dtype).min)[None, None]
    seen: list[Tensor] = []
    handle = layer.self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
    try:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary)
    finally:
        handle.remove()
    return hidden, seen[-1]


class _Row:
    """One prompt row without its padding: embeddings [L, D] with each image's merged features over its
    placeholders, the image mask [L], M-RoPE positions [3, L] and each image's features [n_i, D] in order (`grids`:
    each image's (h, w) patch grid)."""

    def __init__(self, model: nn.Module, row: Tensor, features: list[Tensor], grids: list[tuple[int, int]]) -> None:
        config = model.config
        self.image = row == config.image_token_id
        self.embeds = model.get_input_embeddings()(row).clone()
        self.embeds[self.image] = torch.cat(features)
        self.positions = mrope_positions(row, config.image_token_id, grids, config.vision_config.spatial_merge_size)
        self.features = features

    def run(self, model: nn.Module, rows: Tensor, generated: list[int], upto: int | None = None,
            keep_after: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Every decoder layer on the prompt rows `rows` plus `generated`; after layer `upto`, `keep_after(probs)`
        names the prompt rows (indices into `rows`) that go on. Returns the last hidden states [1, n, D] and the
        rows kept."""
        lm = model.model.language_model
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
        t = len(generated)
        top = int(self.positions.max())
        hidden = torch.cat([self.embeds[rows], new])[None]
        where = torch.cat([self.positions[:, rows], (top + 1 + torch.arange(t))[None].expand(3, -1)], dim=1)
        for i in range(len(lm.layers)):
            hidden, probs = _layer(model, i, hidden, where)
            if i == upto and keep_after is not None:
                if probs is None:
                    raise ValueError(f"layer {i} is a Gated DeltaNet layer: FastV needs an attention layer")
                chosen = torch.cat([keep_after(probs[:, :, : len(rows), : len(rows)]),
                                    torch.arange(len(rows), len(rows) + t)])
                rows, hidden, where = rows[chosen[: -t or None]], hidden[:, chosen], where[:, chosen]
        return hidden, rows


def _last_token(model: nn.Module, hidden: Tensor) -> int:
    return int(model.lm_head(model.model.language_model.norm(hidden[0, -1])).argmax())


def _rows(model: nn.Module, inputs: dict[str, Tensor]) -> list[tuple[int, _Row]]:
    """Per prompt row: its padding count and its `_Row` (every row holds as many images; `image_grid_thw` lists
    them row by row)."""
    out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    features = list(out.pooler_output)
    grids = [(int(h), int(w)) for _, h, w in inputs["image_grid_thw"].tolist()]
    per_row = len(features) // inputs["input_ids"].shape[0]
    rows = []
    for b, (ids, valid) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True)):
        mine = slice(b * per_row, (b + 1) * per_row)
        rows.append((int((~valid).sum()), _Row(model, ids[valid], features[mine], grids[mine])))
    return rows


@torch.no_grad()
def fastv_hybrid_generate(model: nn.Module, inputs: dict[str, Tensor], *, layer: int, keep: int,
                          max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation on a Qwen3.5 model for a (left-padded) batch of `inputs` as its processor gives them.
    Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token indices into that row of
    `input_ids` (padding included), ascending."""
    ref = _eager(model)
    tokens, kept_rows = [], []
    for pad, row in _rows(ref, inputs):
        image_idx = row.image.nonzero().flatten()

        def fastv(probs: Tensor, image_idx: Tensor = image_idx, image: Tensor = row.image) -> Tensor:
            scores = probs[0].mean(0)[-1]
            order = torch.sort(scores[image_idx], descending=True, stable=True).indices[:keep]
            return torch.sort(torch.cat([(~image).nonzero().flatten(), image_idx[order]])).values

        everything = torch.arange(row.image.shape[0])
        generated: list[int] = []
        kept = everything
        for _ in range(max_new_tokens):
            hidden, kept = row.run(ref, everything, generated, layer, fastv)
            generated.append(_last_token(ref, hidden))
        tokens.append(generated)
        kept_rows.append(kept[row.image[kept]] + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows


@torch.no_grad()
def projector_hybrid_generate(model: nn.Module, inputs: dict[str, Tensor], select: Callable[[Tensor], Tensor],
                              *, max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy generation where `select(features [n, D]) -> [n] bool` keeps, per image, some of its merged tokens
    before the LLM. Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token indices into that
    row of `input_ids` (padding included), ascending."""
    ref = _eager(model)
    tokens, kept_rows = [], []
    for pad, row in _rows(ref, inputs):
        chosen = torch.cat([select(f) for f in row.features])
        kept = row.image.nonzero().flatten()[chosen]
        rows = torch.sort(torch.cat([(~row.image).nonzero().flatten(), kept])).values
        generated: list[int] = []
        for _ in range(max_new_tokens):
            generated.append(_last_token(ref, row.run(ref, rows, generated)[0]))
        tokens.append(generated)
        kept_rows.append(kept + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows
