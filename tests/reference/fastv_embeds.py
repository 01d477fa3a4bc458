"""FastV (Chen et al., arXiv:2403.06764) on families whose LLM takes 1-D positions but whose image features need
more than `pixel_values` (LLaVA-OneVision-1.5: per-image grids, a packed tower); shares no code with policyc.

The semantics are tests/reference/fastv.py's (the LAST prompt token's attention after layer `layer`, mean over heads;
the top `keep` image tokens and every text token go on at their original position ids; greedy decoding without a
cache, one row at a time), run on the embeddings the unmodified model's language model receives for the whole prompt
(tests/reference/before_llm.py `llm_inputs`: text embeddings with the image features written over the placeholders).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference.before_llm import llm_inputs
from reference.fastv import _fastv_row, eager_copy


@torch.no_grad()
def fastv_generate_from_inputs(model: nn.Module, inputs: dict[str, Tensor], image_token_ids: tuple[int, ...], *,
                               layer: int, keep: int, max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV tokens [B, max_new_tokens] for a (left-padded) batch of processor `inputs`, and per row the kept
    image-token indices into that row of `input_ids` (padding included), ascending."""
    ref = eager_copy(model)
    embeds = llm_inputs(ref, inputs)
    image = torch.isin(inputs["input_ids"], torch.tensor(image_token_ids))
    tokens, kept = [], []
    for row in range(embeds.shape[0]):
        row_tokens, row_kept = _fastv_row(ref, embeds[row], inputs["attention_mask"][row].bool(), image[row], layer,
                                          keep, max_new_tokens)
        tokens.append(row_tokens)
        kept.append(row_kept)
    return torch.stack(tokens), kept


__all__ = ["fastv_generate_from_inputs"]
