"""What a LLaVA vision tower that shrinks its rows hands on, for the encoder-method references (Turbo, ATS, GTP-ViT):
each row's projected feature in the slot of its earliest original patch, the tokens in the order the LLM reads them,
and the LLM's last logits on each prompt whose image run holds those tokens. Written plainly, one image and one
prompt row at a time; shares no code with policyc."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import has_cls, project, strategy_start


def slot_features(model: LlavaForConditionalGeneration, x: Tensor, members: list[list[int]],
                  ) -> tuple[Tensor, Tensor]:
    """The rows x [T', C] (row i holding the original encoder positions members[i]; positions held by no row were
    dropped) as LLaVA's image tokens:
    projected features [N, D] with each row in the slot of its earliest position (zeros elsewhere), and the
    filled slots [N] bool. Rows at a position LLaVA does not project (CLS) are left out."""
    start, vision = strategy_start(model), model.config.vision_config
    width = (vision.image_size // vision.patch_size) ** 2 + int(has_cls(model)) - start
    slots = torch.zeros(width, x.shape[-1])
    filled = torch.zeros(width, dtype=torch.bool)
    for row, group in enumerate(members):
        slot = min(group) - start
        if slot >= 0:
            slots[slot], filled[slot] = x[row], True
    projected = project(model, slots)
    return torch.where(filled[:, None], projected, torch.zeros_like(projected)), filled


def llm_tokens(model: LlavaForConditionalGeneration, x: Tensor, members: list[list[int]], order: str) -> Tensor:
    """The projected tokens [n, D] the LLM reads: by earliest position ("spatial") or in row order ("code")."""
    start = strategy_start(model)
    rows = [row for row, group in enumerate(members) if min(group) >= start]
    if order == "spatial":
        rows.sort(key=lambda row: min(members[row]))
    return project(model, x[rows])


@torch.no_grad()
def spliced_last_logits(model: LlavaForConditionalGeneration, inputs: dict[str, Tensor], images: list[Tensor],
                        ) -> Tensor:
    """The LLM's logits at each prompt row's last position [B, V]: the row without its padding, its image
    placeholders replaced by `images[row]` [n, D], positions 0..L'-1 (one image per row)."""
    decoder, head, table = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    logits = []
    for ids, valid, tokens in zip(inputs["input_ids"], inputs["attention_mask"].bool(), images, strict=True):
        ids = ids[valid]
        image = (ids == model.config.image_token_id).nonzero().flatten()
        first, end = int(image[0]), int(image[-1]) + 1
        sequence = torch.cat([table(ids[:first]), tokens.to(table.weight.dtype), table(ids[end:])])
        out = decoder(inputs_embeds=sequence[None], position_ids=torch.arange(len(sequence))[None], use_cache=False)
        logits.append(head(out.last_hidden_state[0, -1]))
    return torch.stack(logits)
