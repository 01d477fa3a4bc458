"""Dropping image tokens before the LLM, for any model family with 1-D positions and causal masks, written plainly;
shares no code with policyc.

What a stage before the LLM means: the LLM sees a shorter prompt that holds only the kept image tokens, as if the
processor had written fewer placeholders. So:
- the LLM's input embeddings are captured from one unmodified forward of the whole prompt (text embeddings with
  the image features written over the placeholders, whatever the family's projector and tiling);
- per row, without its padding, the dropped image rows are removed, and position ids are 0..L'-1;
- greedy decoding without a cache: each step runs the decoder on the kept prompt rows plus the generated tokens.
`choose(features [n, D]) -> [n] bool` picks each image's kept tokens; an "image" is one run of `tokens` image
tokens (a tile, for tiling families), in prompt order, or, for images of their own sizes (LLaVA-NeXT's anyres), the
given count of tokens per image; tokens an image must keep (LLaVA-NeXT's newlines) are left out of `choose`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def llm_inputs(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The embeddings [B, L, D] the unmodified model's language model receives for `inputs`."""
    decoder = model.get_decoder()
    seen: list[Tensor] = []
    handle = decoder.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def before_llm_generate(model: nn.Module, inputs: dict[str, Tensor], image_token_id: int, tokens: int,
                        choose: Callable[[Tensor], Tensor], *, max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy tokens [B, max_new_tokens] and, per row, the kept image-token indices into that row of `input_ids`
    (padding included), ascending."""
    generated, kept, _ = before_llm_run(model, inputs, image_token_id, tokens, choose, max_new_tokens=max_new_tokens)
    return generated, kept


@torch.no_grad()
def before_llm_run(model: nn.Module, inputs: dict[str, Tensor], image_token_id: int | tuple[int, ...],
                   tokens: int | list[list[int]], choose: Callable[[Tensor], Tensor], *, max_new_tokens: int,
                   candidates: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy tokens [B, max_new_tokens], per row the kept image-token indices into that row of `input_ids`
    (padding included, ascending), and the logits of every step [B, max_new_tokens, V].

    `tokens`: every image is a run of that many image tokens, or per row the token count of each of its images
    in order (images of their own sizes). `image_token_id` may name several ids (images and videos). `candidates`
    (features [n, D] -> [n] bool) says which tokens of an image a stage may drop (LLaVA-NeXT: not the newline
    rows); `choose` then gets those tokens' features only and returns which of them stay."""
    embeds = llm_inputs(model, inputs)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    ids_of_images = torch.tensor([image_token_id] if isinstance(image_token_id, int) else list(image_token_id))
    generated_rows, kept_rows, logits_rows = [], [], []
    for row, valid in zip(range(embeds.shape[0]), inputs["attention_mask"].bool(), strict=True):
        ids, hidden = inputs["input_ids"][row], embeds[row]
        image = torch.isin(ids, ids_of_images) & valid
        image_idx = image.nonzero().flatten()
        sizes = [tokens] * (image_idx.numel() // tokens) if isinstance(tokens, int) else list(tokens[row])
        if sum(sizes) != image_idx.numel():
            raise ValueError(f"{image_idx.numel()} image tokens are not images of {sizes} tokens")
        keep = valid.clone()
        keep[image_idx] = False
        for run in image_idx.split(sizes):
            droppable = candidates(hidden[run]) if candidates is not None else torch.ones(len(run), dtype=torch.bool)
            keep[run[~droppable]] = True
            chosen = run[droppable]
            keep[chosen[choose(hidden[chosen])]] = True
        kept_rows.append((keep & image).nonzero().flatten())
        prompt = hidden[keep]
        generated: list[int] = []
        step_logits = []
        for _ in range(max_new_tokens):
            new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
            sequence = torch.cat([prompt, new.to(prompt.dtype)])[None]
            positions = torch.arange(sequence.shape[1])[None]
            out = decoder(inputs_embeds=sequence, position_ids=positions, use_cache=False)
            logits = head(out.last_hidden_state[0, -1])
            step_logits.append(logits)
            generated.append(int(logits.argmax()))
        generated_rows.append(generated)
        logits_rows.append(torch.stack(step_logits))
    return torch.tensor(generated_rows, dtype=torch.long), kept_rows, torch.stack(logits_rows)
