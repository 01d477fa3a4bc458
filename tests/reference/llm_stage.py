"""One image-token drop inside the LLM, decided by any rule that reads the stage layer's output and attention;
shares no code with policyc (ToDRE's relevance stage, tests/reference/todre.py; EfficientVLA,
tests/reference/efficientvla.py).

Per row, on its own: run decoder layers 0..`layer` over the prompt (eager attention, causal with padding keys
masked, position ids counting the non-padding tokens), hand `pick` that layer's output hidden [L, D] and its
post-softmax attention [H, L, L], keep the text rows and the image rows `pick` returns, and run the later layers
on those rows only, at their ORIGINAL position ids. Greedy decoding WITHOUT a KV cache: every step recomputes
layers 0..`layer` on the whole prompt plus the generated tokens, and the later layers on the kept prompt rows plus
the generated tokens (generated token t at position n_real + t); the kept set is the prefill's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastv import eager_copy, position_ids, prompt_embeddings, run_layers

# pick(row, hidden [L, D], probs [H, L, L], valid [L], image [L]) -> kept image positions [k] (indices into the row)
Pick = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]


def _row(model: LlavaForConditionalGeneration, row: int, embeds: Tensor, valid: Tensor, image: Tensor, layer: int,
         pick: Pick, max_new_tokens: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    lm = model.get_decoder()
    length, device = embeds.shape[0], embeds.device
    positions = position_ids(valid)
    n_real = int(valid.sum())
    hidden, probs = run_layers(model, range(layer + 1), embeds[None], positions, valid)
    kept_image = torch.sort(pick(row, hidden[0], probs[0], valid, image)).values
    if not bool(image[kept_image].all()):
        raise ValueError("pick must return image positions")
    prompt_rows = torch.sort(torch.cat([(~image).nonzero().flatten(), kept_image])).values
    generated: list[int] = []
    logits: list[Tensor] = []
    for t in range(max_new_tokens):
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long, device=device))
        states = torch.cat([embeds, new.to(embeds.dtype)])[None]
        step_positions = torch.cat([positions, n_real + torch.arange(t, device=device)])
        ok = torch.cat([valid, torch.ones(t, dtype=torch.bool, device=device)])
        states, _ = run_layers(model, range(layer + 1), states, step_positions, ok)
        rows = torch.cat([prompt_rows, torch.arange(length, length + t, device=device)])
        states, _ = run_layers(model, range(layer + 1, len(lm.layers)), states[:, rows], step_positions[rows], ok[rows])
        logits.append(model.lm_head(lm.norm(states[0, -1])))
        generated.append(int(logits[-1].argmax()))
    return torch.tensor(generated, dtype=torch.long, device=device), kept_image, logits


@torch.no_grad()
def llm_stage_generate(model: LlavaForConditionalGeneration, embeds: Tensor, valid: Tensor, image: Tensor, *,
                       layer: int, pick: Pick, max_new_tokens: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy decoding of every row of the LLM inputs `embeds` [B, L, D] (`valid`, `image`: [B, L] bool) with one
    drop after decoder `layer`: the tokens [B, T], per row the kept image positions (ascending), the logits
    [B, T, V]. `model` should be an eager copy (`eager_copy`)."""
    results = [_row(model, b, embeds[b], valid[b], image[b], layer, pick, max_new_tokens)
               for b in range(embeds.shape[0])]
    return (torch.stack([r[0] for r in results]), [r[1] for r in results],
            torch.stack([torch.stack(r[2]) for r in results]))


def llava_llm_inputs(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                     pixel_values: Tensor) -> tuple[LlavaForConditionalGeneration, Tensor, Tensor, Tensor]:
    """An eager copy of `model` and its LLM inputs: embeddings [B, L, D], valid and image masks [B, L]."""
    ref = eager_copy(model)
    with torch.no_grad():
        embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    return ref, embeds, attention_mask.bool(), input_ids == ref.config.image_token_id


__all__ = ["Pick", "llava_llm_inputs", "llm_stage_generate"]
