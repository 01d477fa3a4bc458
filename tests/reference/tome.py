"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", arXiv:2210.09461; facebookresearch/ToMe) in a
LLaVA vision tower, written plainly from the paper and its `bipartite_soft_matching` / `merge_wavg` /
`ToMeAttention`; shares no code with policyc.

Exact semantics of this reference, one image at a time:
- In every encoder layer up to LLaVA's feature layer: x = x + attn(ln1(x)) with log(size) added to every
  attention logit of key j (proportional attention; sizes start at 1), then bipartite soft matching on
  x, then x = x + mlp(ln2(x)).
- Matching: metric = the layer's attention keys, mean over heads, L2-normalised. A = tokens 0, 2, 4, ...,
  B = tokens 1, 3, ...; scores = cosine; the CLS token (a[0], CLIP only) never merges (its row is -inf).
  r = min(r, (t - protected) // 2). Each A token's best B match; the r A tokens with the highest best
  score (descending, stable) merge into their matches: x_b = sum(size * x) / sum(size) over the group,
  size_b = sum(size). Output order: the unmerged A tokens in index order (ToMe's code with a class token;
  without one ToMe leaves them in score order: policyc keeps index order, and so does this reference),
  then all of B.
- Each token remembers its original members; LLaVA's image feature of a token sits in the slot of its
  earliest original patch. Returns the projected features [N, D] per slot and the slots filled.
- The order the LLM receives the tokens in (`tome_llm_tokens`, `tome_last_logits`): "spatial", by earliest
  original patch; "code", the rows as the last merge at LLaVA's feature layer emitted them (ToMe's code
  order). Either way the tokens holding an encoder position LLaVA does not project (CLS: it never merges and
  stays the first row) are left out. The LLM then runs on the prompt with the image's placeholders replaced
  by those tokens, positions 0..L'-1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.vision import attention, embed, feature_layer, has_cls, layers, project, strategy_start


def bipartite(x: Tensor, keys: Tensor, size: Tensor, members: list[list[int]], r: int, cls: bool,
              penalty: Tensor | None = None) -> tuple[Tensor, Tensor, list[list[int]]]:
    """ToMe's bipartite merge of the rows x [t, C]; `penalty` [t] (Turbo): subtracted from every score of a source
    (A) row, so it changes which A rows merge, not where they go."""
    tokens = x.shape[0]
    r = min(r, (tokens - int(cls)) // 2)
    if r <= 0:
        return x, size, members
    metric = keys.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    scores = metric[a] @ metric[b].T
    if penalty is not None:
        scores = scores - penalty[a][:, None]
    if cls:
        scores[0, :] = float("-inf")
    best, match = scores.max(dim=-1)
    ranking = torch.sort(best, descending=True, stable=True).indices.tolist()
    merged, unmerged = ranking[:r], sorted(ranking[r:])
    sums = [x[j] * size[j] for j in b]
    sizes = [size[j].clone() for j in b]
    groups = [list(members[j]) for j in b]
    for i in merged:
        j = int(match[i])
        sums[j] = sums[j] + x[a[i]] * size[a[i]]
        sizes[j] = sizes[j] + size[a[i]]
        groups[j] += members[a[i]]
    new_x = torch.stack([x[a[i]] for i in unmerged] + [s / n for s, n in zip(sums, sizes, strict=True)])
    new_size = torch.stack([size[a[i]] for i in unmerged] + sizes)
    return new_x, new_size, [members[a[i]] for i in unmerged] + groups


def encode(model: LlavaForConditionalGeneration, image: Tensor, r: int) -> tuple[Tensor, list[list[int]]]:
    """ToMe through LLaVA's feature layer for one image [3, H, W]: the rows [T', C] in ToMe's code order and
    each row's original encoder positions."""
    cls, last = has_cls(model), feature_layer(model)
    x = embed(model, image)
    size = torch.ones(x.shape[0])
    members = [[i] for i in range(x.shape[0])]
    for layer in list(layers(model))[: last + 1]:
        out, keys, _ = attention(layer.self_attn, layer.layer_norm1(x), size.log())
        x = x + out
        x, size, members = bipartite(x, keys, size, members, r, cls)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, members


@torch.no_grad()
def tome_llm_tokens(model: LlavaForConditionalGeneration, pixel_values: Tensor, r: int, order: str,
                    ) -> list[Tensor]:
    """Per image, its projected tokens [n, D] in the order the LLM receives them ("spatial" or "code")."""
    start = strategy_start(model)
    tokens = []
    for image in pixel_values:
        x, members = encode(model, image, r)
        rows = [row for row, group in enumerate(members) if min(group) >= start]
        if order == "spatial":
            rows.sort(key=lambda row: min(members[row]))
        tokens.append(project(model, x[rows]))
    return tokens


@torch.no_grad()
def tome_last_logits(model: LlavaForConditionalGeneration, inputs: dict[str, Tensor], r: int, order: str,
                     ) -> Tensor:
    """The LLM's logits at each row's last position [B, V], each row's image placeholders replaced by that
    image's tokens in `order` (one image per row, no padding)."""
    images = tome_llm_tokens(model, inputs["pixel_values"], r, order)
    decoder, head, table = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    logits = []
    for ids, tokens in zip(inputs["input_ids"], images, strict=True):
        image = (ids == model.config.image_token_id).nonzero().flatten()
        first, end = int(image[0]), int(image[-1]) + 1
        sequence = torch.cat([table(ids[:first]), tokens.to(table.weight.dtype), table(ids[end:])])
        out = decoder(inputs_embeds=sequence[None], position_ids=torch.arange(len(sequence))[None], use_cache=False)
        logits.append(head(out.last_hidden_state[0, -1]))
    return torch.stack(logits)


@torch.no_grad()
def tome_image_features(model: LlavaForConditionalGeneration, pixel_values: Tensor, r: int,
                        ) -> tuple[Tensor, Tensor]:
    """Projected image features [I, N, D] (zeros in empty slots) and the filled slots [I, N] bool."""
    start = strategy_start(model)
    features, filled = [], []
    for image in pixel_values:
        x, members = encode(model, image, r)
        tokens = sum(len(group) for group in members)
        slots = torch.zeros(tokens - start, x.shape[-1])
        kept = torch.zeros(tokens - start, dtype=torch.bool)
        for row, group in enumerate(members):
            slot = min(group) - start
            if slot >= 0:
                slots[slot], kept[slot] = x[row], True
        projected = project(model, slots)
        features.append(torch.where(kept[:, None], projected, torch.zeros_like(projected)))
        filled.append(kept)
    return torch.stack(features), torch.stack(filled)


__all__ = ["tome_image_features", "tome_last_logits", "tome_llm_tokens"]
