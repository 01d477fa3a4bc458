"""FastV on Gemma 3, as its released code does it; shares no code with policyc.

FastV: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764. After LLM decoder layer
`layer`, every image token is scored by the attention the LAST prompt token pays it (post-softmax probabilities of
that layer, mean over heads); the top `keep` image tokens (ties to the earlier token) and every text token go on,
at their ORIGINAL position ids.

Gemma 3's masks (arXiv:2503.19786 §2; transformers' `create_masks_for_vision_model`), written out here from that
spec, one row at a time without its padding, over token indices q (query) and k (key):
- global layers: k <= q, or q and k are image tokens of the same image (one contiguous run of image tokens):
  an image attends to itself both ways;
- local (sliding) layers: the same, and q - k < window (transformers' `kv > q - window`), both ways.
After the drop, the later layers run on the kept tokens only and each keeps the mask entries of its kept rows and
columns, by their ORIGINAL indices (so the window counts original positions, and kept image tokens of one image
still see each other both ways). Each layer type has its own rotary embedding (local and global bases).

Decoding: greedy, NO KV cache, eager attention. Each step recomputes layers 0..layer on the whole row plus the
generated tokens, and later layers on the text, kept image and generated tokens; the kept set is the prefill's.
Exactly max_new_tokens tokens per row.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def eager_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with eager attention, in eval mode (the references run its layers one by one)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def unpadded_rows(ref: nn.Module, inputs: dict[str, Tensor]) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Per row of `inputs`: its left padding, which of its unpadded tokens are image tokens ([L] bool) and its
    embeddings with the image features written in ([L, D]), images taken in order across the batch."""
    features = ref.model.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
    cursor = 0
    for ids, valid in zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True):
        row = ids[valid]
        image = row == ref.config.image_token_id
        embeds = ref.get_input_embeddings()(row).clone()
        count = int(image.sum())
        embeds[image] = features[cursor:cursor + count].to(embeds.dtype)
        cursor += count
        yield int((~valid).sum()), image, embeds


def gemma3_allowed(image: Tensor, length: int, window: int | None) -> Tensor:
    """[n, n] bool: which key k query q may attend to, for a row of n tokens whose first `image.shape[0]` are the
    prompt (`image` marks its image tokens) and the rest generated text; `window`: a sliding layer's window."""
    n = length
    block = torch.full((n,), -1, dtype=torch.long)
    run = -1
    for i in range(image.shape[0]):
        if bool(image[i]):
            if i == 0 or not bool(image[i - 1]):
                run += 1
            block[i] = run
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    allowed = (k <= q) | ((block[:, None] == block[None, :]) & (block[:, None] >= 0))
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def _run_layers(model: nn.Module, layers: range, hidden: Tensor, positions: Tensor, rows: Tensor,
                allowed: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """Decoder layers `layers` on hidden [1, m, D], the rows `rows` [m] of the whole sequence (original indices,
    positions [m]); `allowed` maps each layer type to its mask over the whole sequence. Returns the hidden states
    and the last layer's attention probabilities [1, H, m, m]."""
    lm = model.model.language_model
    types = model.config.text_config.layer_types
    seen: list[Tensor] = []
    for i in layers:
        sub = allowed[types[i]][rows][:, rows]
        mask = torch.zeros(sub.shape, dtype=hidden.dtype).masked_fill(~sub, torch.finfo(hidden.dtype).min)
        cos_sin = lm.rotary_emb(hidden, positions[None], types[i])
        handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
        try:
            hidden = lm.layers[i](hidden, attention_mask=mask[None, None], position_embeddings=cos_sin,
                                  position_ids=positions[None])
        finally:
            handle.remove()
    return hidden, (seen[-1] if seen else None)


@torch.no_grad()
def fastv_gemma3_generate(model: nn.Module, inputs: dict[str, Tensor], *, layer: int, keep: int,
                          max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation on a Gemma 3 model for a (left-padded) batch of `inputs` as its processor gives
    them. Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token indices into that row of
    `input_ids` (padding included), ascending."""
    ref = eager_copy(model)
    window = ref.config.text_config.sliding_window
    lm = ref.model.language_model
    tokens, kept_rows = [], []
    for pad, image, embeds in unpadded_rows(ref, inputs):
        length = embeds.shape[0]
        everything = torch.arange(length)
        masks = {"full_attention": gemma3_allowed(image, length, None),
                 "sliding_attention": gemma3_allowed(image, length, window)}
        _, probs = _run_layers(ref, range(layer + 1), embeds[None], everything, everything, masks)
        scores = probs[0].mean(0)[-1]
        image_idx = image.nonzero().flatten()
        order = torch.sort(scores[image_idx], descending=True, stable=True).indices[:keep]
        kept = image_idx[torch.sort(order).values]
        prompt_rows = torch.sort(torch.cat([(~image).nonzero().flatten(), kept])).values
        generated: list[int] = []
        for t in range(max_new_tokens):
            new = ref.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
            hidden = torch.cat([embeds, new])[None]
            total = torch.arange(length + t)
            masks = {"full_attention": gemma3_allowed(image, length + t, None),
                     "sliding_attention": gemma3_allowed(image, length + t, window)}
            hidden, _ = _run_layers(ref, range(layer + 1), hidden, total, total, masks)
            later = torch.cat([prompt_rows, torch.arange(length, length + t)])
            hidden, _ = _run_layers(ref, range(layer + 1, len(lm.layers)), hidden[:, later], later, later, masks)
            generated.append(int(ref.lm_head(lm.norm(hidden[0, -1])).argmax()))
        tokens.append(generated)
        kept_rows.append(kept + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows


__all__ = ["eager_copy", "fastv_gemma3_generate", "gemma3_allowed", "unpadded_rows"]
