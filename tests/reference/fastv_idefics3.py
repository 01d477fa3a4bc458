"""FastV on Idefics3 and SmolVLM, as its released code does it; shares no code with policyc.

FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764 (pkunlp-icler/FastV).
The semantics are tests/reference/fastv.py's (its per-row decoding is reused): after LLM decoder layer
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

from reference.fastv import _fastv_row, eager_copy


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
