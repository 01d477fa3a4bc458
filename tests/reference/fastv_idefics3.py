"""FastV on Idefics3 and SmolVLM, as its released code does it; shares no code with policyc.

FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764 (pkunlp-icler/FastV).
The semantics are tests/reference/fastv.py's (its selection helpers are reused): after LLM decoder layer
`layer`, every image token is scored by the attention the LAST prompt token pays it (post-softmax, mean over
heads); the top `keep` image tokens and every other token go on at their ORIGINAL 1-D position ids
(`cumsum(attention_mask) - 1`), causal mask with padding keys masked; greedy decoding with NO KV cache
(layers 0..layer recomputed on the whole row each step, later layers on the kept prompt rows plus the
generated tokens); the kept set is the prefill's.

What this family changes, and why the LLaVA reference cannot run on it:
- the image tokens are every `<image>` id of the row: one run per tile and per global view, the runs
  separated by `<fake_token_around_image>`, `<row_r_col_c>`, `<global-img>` and newline ids. Those markers
  are ordinary text tokens here (they carry no image features): FastV never drops them, and `keep` counts
  the row's `<image>` tokens of all its tiles together, ranked against each other;
- the image features come from each row's own tiles: a tile or global view is an image of `pixel_values`
  [B, N, 3, H, W] that is not all zeros (the processor's padding), its real patches those with any real pixel
  in `pixel_attention_mask`; the encoder's last hidden state goes through the connector (pixel shuffle and
  projection) and the tokens are written over the row's `<image>` ids in order;
- the LLM is `model.model.text_model` (a Llama), the head `model.lm_head`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference.fastv import eager_copy, keep_count, position_ids, top_indices


def row_embeddings(model: nn.Module, input_ids: Tensor, pixel_values: Tensor, pixel_mask: Tensor) -> Tensor:
    """One row's LLM input [L, D]: token embeddings, each `<image>` run overwritten by its tile's features.
    `input_ids` [L], `pixel_values` [N, 3, H, W] and `pixel_mask` [N, H, W] of that row."""
    embeds = model.model.text_model.embed_tokens(input_ids).clone()
    real = pixel_values.flatten(1).ne(0).any(1)
    patch = model.config.vision_config.patch_size
    mask = pixel_mask[real]
    patches = mask.unfold(1, patch, patch).unfold(2, patch, patch).flatten(3).any(-1)  # [n, H/p, W/p]
    encoded = model.model.vision_model(pixel_values=pixel_values[real], patch_attention_mask=patches).last_hidden_state
    features = model.model.connector(encoded).flatten(0, 1)
    image = input_ids == model.config.image_token_id
    if int(image.sum()) != features.shape[0]:
        raise ValueError(f"{int(image.sum())} image tokens but {features.shape[0]} image features")
    embeds[image] = features.to(embeds.dtype)
    return embeds


def _causal_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive [1, 1, n, n] mask: query i sees key j iff j <= i and key j is not padding."""
    n = valid.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & valid[None, :]
    return torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _run_layers(model: nn.Module, layers: range, hidden: Tensor, positions: Tensor,
                valid: Tensor) -> tuple[Tensor, Tensor | None]:
    """Text-model layers `layers` on one sequence hidden [1, n, D] at positions [n]; returns the hidden states and
    the last layer's attention probabilities [1, H, n, n]."""
    lm = model.model.text_model
    cos_sin = lm.rotary_emb(hidden, position_ids=positions[None])
    mask = _causal_mask(valid, hidden.dtype)
    seen: list[Tensor] = []
    for i in layers:
        handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
        try:
            hidden = lm.layers[i](hidden, attention_mask=mask, position_ids=positions[None],
                                  position_embeddings=cos_sin)
        finally:
            handle.remove()
    return hidden, (seen[-1] if seen else None)


def _fastv_row(model: nn.Module, embeds: Tensor, valid: Tensor, image: Tensor, layer: int, keep: int | float,
               max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """FastV greedy decoding of one left-padded row: embeds [L, D], valid and image [L] booleans."""
    lm = model.model.text_model
    length = embeds.shape[0]
    if not bool(valid[-1]):
        raise ValueError("only left padding is supported: the last prompt token must not be padding")
    prompt_positions, n_real = position_ids(valid), int(valid.sum())
    image_idx = image.nonzero().flatten()
    _, probs = _run_layers(model, range(layer + 1), embeds[None], prompt_positions, valid)
    scores = probs[0].mean(dim=0)[length - 1]
    kept = image_idx[top_indices(scores[image_idx], keep_count(keep, len(image_idx)))]
    prompt_rows = torch.sort(torch.cat([(~image).nonzero().flatten(), kept])).values
    generated: list[int] = []
    for t in range(max_new_tokens):
        new = lm.embed_tokens(torch.tensor(generated, dtype=torch.long))
        hidden = torch.cat([embeds, new.to(embeds.dtype)])[None]
        positions = torch.cat([prompt_positions, n_real + torch.arange(t)])
        ok = torch.cat([valid, torch.ones(t, dtype=torch.bool)])
        hidden, _ = _run_layers(model, range(layer + 1), hidden, positions, ok)
        rows = torch.cat([prompt_rows, torch.arange(length, length + t)])
        hidden, _ = _run_layers(model, range(layer + 1, len(lm.layers)), hidden[:, rows], positions[rows], ok[rows])
        generated.append(int(model.lm_head(lm.norm(hidden[0, -1])).argmax()))
    return torch.tensor(generated, dtype=torch.long), kept


@torch.no_grad()
def fastv_idefics3_generate(model: nn.Module, inputs: dict[str, Tensor], *, layer: int, keep: int | float,
                            max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation on an Idefics3/SmolVLM model (CPU) for a left-padded batch `inputs`
    (input_ids, attention_mask, pixel_values, pixel_attention_mask). Returns the new tokens [B, max_new_tokens]
    and, per row, the kept `<image>` indices into that row of `input_ids` (padding included), ascending."""
    ref = eager_copy(model)
    if not 0 <= layer < len(ref.model.text_model.layers):
        raise ValueError(f"layer {layer} outside the text model's layers")
    tokens, kept = [], []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b]
        embeds = row_embeddings(ref, ids, inputs["pixel_values"][b], inputs["pixel_attention_mask"][b])
        row_tokens, row_kept = _fastv_row(ref, embeds, inputs["attention_mask"][b].bool(),
                                          ids == ref.config.image_token_id, layer, keep, max_new_tokens)
        tokens.append(row_tokens)
        kept.append(row_kept)
    return torch.stack(tokens), kept


__all__ = ["fastv_idefics3_generate", "row_embeddings"]
