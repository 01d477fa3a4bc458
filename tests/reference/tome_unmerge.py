"""ToMe (Bolya et al., arXiv:2210.09461) inside the vision tower of a family whose connector needs the whole patch
grid (Gemma 3's pooling, Idefics3/SmolVLM's and InternVL's pixel shuffle), with ToMe for Stable Diffusion's unmerge
(Bolya & Hoffman, arXiv:2303.17604) at the tower's output; written plainly, shares no code with policyc.

Exact semantics, one encoder image (a tile) at a time:
- The tower's embeddings, then every encoder layer by hand with eager attention: x = x + attn(norm(x)) with
  log(size) added to the logit of every key (proportional attention; sizes start at 1) and padded patches masked
  as keys; then bipartite soft matching on x; then x = x + mlp(norm(x)). InternViT scales both branches by its
  layer-scale vectors (lambda_1, lambda_2) and normalises queries and keys (q_norm, k_norm) before the heads.
- Matching (as tests/reference/tome.py): metric = the layer's keys, mean over heads, L2-normalised; A = tokens
  0, 2, ..., B = 1, 3, ...; only patches merge (not CLS, not padded patches: their scores are -inf);
  r = min(r, mergeable // 2, A tokens with a finite best match). The r A tokens with the highest best score
  (stable) fold into their matches by size-weighted average; the order is unmerged A by index, then B.
- Unmerge: after the tower's final norm, every original position takes the value of the token that holds it
  (LLaVA-NeXT/OneVision: at the feature layer, hidden_states[k], before any final norm; later layers do not run).
The unmerged output replaces the tower's `last_hidden_state` (or `hidden_states[k]`) in one forward of the otherwise
unmodified model (a forward hook on the tower), so the connector, the unpadding and newlines, the placeholders and
the LLM run as the model's own. CLIP's pre-layernorm runs after the embeddings; CLS tokens (CLIP, InternViT) never
merge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def tower(model: nn.Module) -> nn.Module:
    """The vision transformer (Gemma 3, InternVL: `vision_tower`; Idefics3/SmolVLM: `vision_model`)."""
    outer = _outer(model)
    return getattr(outer, "vision_model", outer)


def _layers(vit: nn.Module) -> nn.ModuleList:
    encoder = vit.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def _heads(attn: nn.Module, t: Tensor, heads: int) -> Tensor:
    return t.view(t.shape[0], heads, -1).transpose(0, 1)  # [H, T, d]


def _attend(layer: nn.Module, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Eager self-attention of one layer on its normalised input h [T, C] with a per-key logit bias [T]:
    (output [T, C], keys [H, T, d])."""
    internvit = hasattr(layer, "lambda_1")
    attn = layer.attention if internvit else layer.self_attn
    heads = attn.num_heads
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    if internvit:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = _heads(attn, q, heads), _heads(attn, k, heads), _heads(attn, v, heads)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[None, None, :]
    out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(h.shape[0], -1)
    return (attn.projection_layer(out) if internvit else attn.out_proj(out)), k


def _bipartite(x: Tensor, keys: Tensor, size: Tensor, members: list[list[int]], mergeable: Tensor, r: int,
               ) -> tuple[Tensor, Tensor, list[list[int]], Tensor]:
    tokens = x.shape[0]
    metric = keys.mean(0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    scores = metric[a] @ metric[b].T
    scores[~mergeable[a], :] = float("-inf")
    scores[:, ~mergeable[b]] = float("-inf")
    best, match = scores.max(dim=-1)
    r = min(r, int(mergeable.sum()) // 2, int(torch.isfinite(best).sum()))
    if r <= 0:
        return x, size, members, mergeable
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
    order = [a[i] for i in unmerged]
    new_x = torch.stack([x[t] for t in order] + [s / n for s, n in zip(sums, sizes, strict=True)])
    new_size = torch.stack([size[t] for t in order] + sizes)
    new_mergeable = torch.cat([mergeable[order], mergeable[b]])
    return new_x, new_size, [members[t] for t in order] + groups, new_mergeable


def has_cls(vit: nn.Module) -> bool:
    """CLIP (`class_embedding`) and InternViT (`cls_token`) prepend a CLS token; SigLIP-like towers do not."""
    return hasattr(vit.embeddings, "class_embedding") or hasattr(vit.embeddings, "cls_token")


@torch.no_grad()
def tome_tower(model: nn.Module, pixel_values: Tensor, r: int, padded: Tensor | None = None,
               feature_layer: int | None = None) -> tuple[Tensor, list[list[list[int]]]]:
    """For encoder images `pixel_values` [I, 3, H, W] (with `padded` [I, T] bool: patches the tower masks): the
    tower's unmerged `last_hidden_state` [I, T, C] (after its final norm) or, with `feature_layer` k, its unmerged
    `hidden_states[k]` (the output of layer k - 1: LLaVA-NeXT's features; later layers do not run), and each
    image's merged groups (lists of original positions)."""
    vit = tower(model)
    internvit = not hasattr(vit, "post_layernorm")
    layers = list(_layers(vit)) if feature_layer is None else list(_layers(vit))[:feature_layer]
    outputs, all_groups = [], []
    for index, image in enumerate(pixel_values):
        if padded is not None:  # Idefics3: the patch mask the model derives from pixel_attention_mask
            side = int(padded.shape[1] ** 0.5)
            x = vit.embeddings(pixel_values=image[None], patch_attention_mask=~padded[index].view(1, side, side))[0]
        else:
            embedded = vit.embeddings(image[None])
            x = (embedded[0] if isinstance(embedded, tuple) else embedded)[0]
        if hasattr(vit, "pre_layrnorm"):  # CLIP
            x = vit.pre_layrnorm(x)
        tokens = x.shape[0]
        pad = padded[index] if padded is not None else torch.zeros(tokens, dtype=torch.bool)
        mergeable = ~pad
        if has_cls(vit):
            mergeable[0] = False
        size = torch.ones(tokens)
        members = [[t] for t in range(tokens)]
        for layer in layers:
            first_norm = layer.layernorm_before if internvit else layer.layer_norm1
            second_norm = layer.layernorm_after if internvit else layer.layer_norm2
            padded_now = torch.tensor([pad[group[0]] for group in members])
            bias = size.log().masked_fill(padded_now, float("-inf"))
            out, keys = _attend(layer, first_norm(x), bias)
            x = x + (layer.lambda_1 * out if internvit else out)
            x, size, members, mergeable = _bipartite(x, keys, size, members, mergeable, r)
            mlp = layer.mlp(second_norm(x))
            x = x + (layer.lambda_2 * mlp if internvit else mlp)
        if feature_layer is None:
            x = vit.layernorm(x) if internvit else vit.post_layernorm(x)
        full = torch.empty(tokens, x.shape[-1])
        for row, group in enumerate(members):
            full[group] = x[row]
        outputs.append(full)
        all_groups.append(sorted(sorted(g) for g in members))
    return torch.stack(outputs), all_groups


def _outer(model: nn.Module) -> nn.Module:
    outer = getattr(model.model, "vision_tower", None)
    return outer if outer is not None else model.model.vision_model


@torch.no_grad()
def tower_inputs(model: nn.Module, inputs: dict[str, Tensor]) -> list[Tensor]:
    """The encoder images [I, 3, H, W] the unmodified model hands its tower for `inputs`, one tensor per call of the
    tower (anyres: base views and crops, as the model selects them; OneVision: then the video frames)."""
    seen: list[Tensor] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0])

    handle = _outer(model).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def with_tower_output(model: nn.Module, inputs: dict[str, Tensor], hidden: Tensor | list[Tensor],
                      feature_layer: int | None = None) -> Tensor:
    """Logits [B, L, V] of one forward of the unmodified model whose tower returns `hidden` as its
    `last_hidden_state` (or, with `feature_layer` k, as `hidden_states[k]`); a list: one per call of the tower."""
    outputs = list(hidden) if isinstance(hidden, list) else [hidden]

    def replace(_module: nn.Module, _args: tuple, output: object) -> object:
        value = outputs.pop(0)
        if feature_layer is None:
            output["last_hidden_state"] = value  # type: ignore[index]
        else:
            states = list(output["hidden_states"])  # type: ignore[index]
            states[feature_layer] = value
            output["hidden_states"] = tuple(states)  # type: ignore[index]
        return output

    handle = _outer(model).register_forward_hook(replace)
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        handle.remove()
    if outputs:
        raise ValueError(f"the tower ran {len(hidden) - len(outputs)} times, not {len(hidden)}")
    return logits


def idefics3_encoder_images(inputs: dict[str, Tensor], patch: int) -> tuple[Tensor, Tensor]:
    """The encoder images Idefics3/SmolVLM encode from processor inputs, in order ([I, 3, H, W]: all-zero padding
    images left out), and their padded patches ([I, P] bool: no real pixel under the patch)."""
    pixels, mask = inputs["pixel_values"], inputs["pixel_attention_mask"]
    pixels, mask = pixels.flatten(0, 1), mask.flatten(0, 1)
    real = (pixels != 0).flatten(1).any(1)
    pixels, mask = pixels[real], mask[real]
    patches = mask.unfold(1, patch, patch).unfold(2, patch, patch).sum((-1, -2)) > 0
    return pixels, ~patches.flatten(1)


def groups_of(owner: Tensor) -> list[list[list[int]]]:
    """Merged groups from [I, T] long (each position -> the position whose token holds it), as `tome_tower` gives
    them."""
    result = []
    for row in owner.tolist():
        groups: dict[int, list[int]] = {}
        for position, holder in enumerate(row):
            groups.setdefault(holder, []).append(position)
        result.append(sorted(groups.values()))
    return result


__all__ = ["groups_of", "has_cls", "idefics3_encoder_images", "tome_tower", "tower", "tower_inputs",
           "with_tower_output"]
