"""Random image-token pruning before the LLM: the baseline every method is compared against.

Exact semantics of this reference:
- Random numbers: for every image, a fresh `torch.Generator()` (CPU) seeded with `manual_seed(seed)` draws
  one `torch.rand(n_image, generator=g)` scoring that image's n_image tokens (the number of feature tokens the
  projector gave it). An image's numbers depend on nothing else in the batch.
- Keep: the top `int(n_image * fraction)` tokens of each image by that score (truncation), ties to the lower
  index (stable descending sort), returned sorted by position. Text tokens are all kept.
- The dropped image tokens are removed entirely before the LLM: the LLM sees a shorter prompt whose position
  ids are contiguous over the non-padding tokens, 0..L'-1 (`cumsum(attention_mask) - 1`, HF's convention).
- Decoding: greedy, one plain `model(inputs_embeds=..., attention_mask=..., position_ids=...)` call per new
  token on the whole sequence, no KV cache; no EOS stop: exactly max_new_tokens tokens. Rows run one at a
  time, each keeping its own left padding.
Methods such as FastV (arXiv:2403.06764) are compared against this baseline at equal kept counts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from .fastv import position_ids, prompt_embeddings, top_indices


def random_keep(input_ids: Tensor, image_token_id: int, image_sizes: list[int], fraction: float,
                seed: int) -> list[Tensor]:
    """Per row, the kept image-token indices into that row, following the random-number convention above."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction {fraction} outside [0, 1]")
    sizes = iter(image_sizes)
    kept = []
    for row in input_ids:
        image_idx = (row == image_token_id).nonzero().flatten()
        parts, start = [], 0
        while start < len(image_idx):
            n_image = next(sizes)
            chunk = image_idx[start:start + n_image]
            scores = torch.rand(n_image, generator=torch.Generator().manual_seed(seed))
            parts.append(chunk[top_indices(scores, int(n_image * fraction)).to(chunk.device)])
            start += n_image
        kept.append(torch.cat(parts) if parts else image_idx)
    return kept


def greedy_no_cache(model: LlavaForConditionalGeneration, embeds: Tensor, valid: Tensor,
                    max_new_tokens: int) -> Tensor:
    """Greedy decoding of one row (embeds [L, D], valid [L]), recomputing the whole sequence every step."""
    device = embeds.device
    generated: list[int] = []
    for _ in range(max_new_tokens):
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long, device=device))
        hidden = torch.cat([embeds, new.to(embeds.dtype)])[None]
        mask = torch.cat([valid.long(), torch.ones(len(generated), dtype=torch.long, device=device)])[None]
        logits = model(inputs_embeds=hidden, attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False).logits
        generated.append(int(logits[0, -1].argmax()))
    return torch.tensor(generated, dtype=torch.long, device=device)


@torch.no_grad()
def random_drop_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                         pixel_values: Tensor, *, fraction: float, seed: int,
                         max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy generation after a seeded random drop of image tokens; see the module docstring.

    Returns the new tokens [B, max_new_tokens] and, per row, the kept image-token indices into that row
    of `input_ids` (padding included), ascending. `model` is used as given (expected in eval mode).
    """
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("only left padding is supported")
    embeds, image_sizes = prompt_embeddings(model, input_ids, pixel_values)
    kept = random_keep(input_ids, model.config.image_token_id, image_sizes, fraction, seed)
    tokens = []
    for b, row_kept in enumerate(kept):
        text_idx = (input_ids[b] != model.config.image_token_id).nonzero().flatten()
        rows = torch.sort(torch.cat([text_idx, row_kept])).values
        tokens.append(greedy_no_cache(model, embeds[b, rows], attention_mask[b, rows], max_new_tokens))
    return torch.stack(tokens), kept


__all__ = ["random_drop_generate"]
