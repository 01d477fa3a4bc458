"""Dropping image tokens before Gemma 3's LLM, written plainly; shares no code with policyc.

As tests/reference/before_llm.py, the LLM sees a shorter prompt holding only the kept image tokens, its positions
renumbered 0..L'-1 (each row without its padding), greedy decoding without a cache, eager attention. What Gemma 3
adds (arXiv:2503.19786; its masks are written out in tests/reference/fastv_gemma3.py and checked there against the
ones transformers builds): each layer type has its own mask and rotary embedding, the tokens of one image attend to
each other both ways, and local layers attend within a sliding window. The shorter prompt keeps the kept rows and
columns of every layer's mask over the ORIGINAL prompt (the kept tokens of an image still see each other both ways;
the window counts original positions, as after an LLM-stage drop), so generated token t sits at original index
L + t for its masks and at L' + t for its rotary embedding.

`choose(features [n, D]) -> [n] bool` picks the kept tokens of each image (one run of `<image_soft_token>`); a merge
returns ([n] bool, the image's features [n, D] with the merged ones in the kept slots).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from reference.fastv_gemma3 import eager_copy, gemma3_allowed, unpadded_rows


def _layers(model: nn.Module, hidden: Tensor, positions: Tensor, allowed: dict[str, Tensor]) -> Tensor:
    """Every decoder layer on hidden [1, m, D] at rotary `positions` [m], with each layer type's mask [m, m]."""
    lm = model.model.language_model
    types = model.config.text_config.layer_types
    for i, layer in enumerate(lm.layers):
        mask = torch.zeros(allowed[types[i]].shape, dtype=hidden.dtype)
        mask = mask.masked_fill(~allowed[types[i]], torch.finfo(hidden.dtype).min)
        cos_sin = lm.rotary_emb(hidden, positions[None], types[i])
        hidden = layer(hidden, attention_mask=mask[None, None], position_embeddings=cos_sin,
                       position_ids=positions[None])
    return hidden


@torch.no_grad()
def before_llm_gemma3_run(model: nn.Module, inputs: dict[str, Tensor],
                          choose: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]], *,
                          max_new_tokens: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy tokens [B, max_new_tokens], per row the kept image-token indices into that row of `input_ids`
    (padding included, ascending), and the logits of every step [B, max_new_tokens, V] (Gemma 3's final softcap
    applied, as its lm head output is)."""
    ref = eager_copy(model)
    text_config = ref.config.text_config
    window = text_config.sliding_window
    lm = ref.model.language_model
    tokens_per_image = ref.config.mm_tokens_per_image
    generated_rows, kept_rows, logits_rows = [], [], []
    for pad, image, embeds in unpadded_rows(ref, inputs):
        length = embeds.shape[0]
        keep = ~image
        for run in image.nonzero().flatten().split(tokens_per_image):
            chosen = choose(embeds[run])
            if isinstance(chosen, tuple):  # a merge: the kept slots and the image's new features
                chosen, embeds[run] = chosen[0], chosen[1].to(embeds.dtype)
            keep[run[chosen]] = True
        kept = keep.nonzero().flatten()
        generated: list[int] = []
        step_logits = []
        for t in range(max_new_tokens):
            new = ref.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
            rows = torch.cat([kept, torch.arange(length, length + t)])  # original indices, for the masks
            masks = {"full_attention": gemma3_allowed(image, length + t, None)[rows][:, rows],
                     "sliding_attention": gemma3_allowed(image, length + t, window)[rows][:, rows]}
            hidden = torch.cat([embeds[kept], new])[None]
            hidden = _layers(ref, hidden, torch.arange(rows.shape[0]), masks)
            logits = ref.lm_head(lm.norm(hidden[0, -1]))
            if text_config.final_logit_softcapping is not None:
                cap = text_config.final_logit_softcapping
                logits = torch.tanh(logits / cap) * cap
            step_logits.append(logits)
            generated.append(int(logits.argmax()))
        generated_rows.append(generated)
        kept_rows.append(kept[image[kept]] + pad)
        logits_rows.append(torch.stack(step_logits))
    return torch.tensor(generated_rows, dtype=torch.long), kept_rows, torch.stack(logits_rows)


__all__ = ["before_llm_gemma3_run"]
