"""ToMe (Bolya et al., arXiv:2210.09461) inside Mistral 3's Pixtral tower, with ToMe for Stable Diffusion's unmerge
(arXiv:2303.17604) before the projector; written plainly, shares no code with policyc.

Exact semantics:
- The tower packs every image (cropped to its size, patches in raster order) into one sequence with a
  block-diagonal mask: each image attends only to itself, so this reference runs each image on its own.
- The layers' input and their rotary (cos, sin) per packed patch are read from the unmodified tower (a pre-hook on
  its first layer: `ln_pre` of the patch embeddings, and 2-D rotary at each patch's (row, column)).
- Every layer by hand, eager: x = x + o_proj(attention(attention_norm(x))) with log(size) of every key added to its
  logits and every token rotated at its own patch (a merged group at its receiver's); then ToMe's bipartite
  matching on the layer's post-rotary keys, mean over heads (tests/reference/tome_unmerge.py's `_bipartite`: A =
  even rows, B = odd rows, the r best A rows fold into their matches by size-weighted average, unmerged A rows then
  B rows); then x = x + feed_forward(ffn_norm(x)).
- Unmerge: after the feature layer (the last), every patch takes the row of the token that holds it; the projector
  (RMSNorm, 2x2 patch merger, MLP) reads these [sum P_i, C] in one forward of the otherwise unmodified model (a
  pre-hook on the projector).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference.tome_unmerge import _bipartite


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _layer_input(model: nn.Module, pixel_values: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The unmodified tower's input to its first layer [N, C] and the rotary (cos, sin) [N, d] it hands it."""
    tower = model.model.vision_tower
    seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        cos, sin = kwargs["position_embeddings"]
        seen.append((args[0][0], cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])))

    handle = tower.transformer.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tower(pixel_values, image_sizes=image_sizes)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def tome_pixtral_features(model: nn.Module, pixel_values: Tensor, image_sizes: Tensor, r: int,
                          ) -> tuple[Tensor, list[list[list[int]]], list[list[int]]]:
    """ToMe with `r` merges per image in every layer (between attention and MLP), unmerged after the last layer: the
    features the projector reads [sum P_i, C], each image's merged groups (sorted lists of packed positions) and
    each image's rows per layer."""
    tower = model.model.vision_tower
    patch = tower.config.patch_size
    embedded, cos, sin = _layer_input(model, pixel_values, image_sizes)
    output = torch.empty_like(embedded)
    all_groups, all_rows, offset = [], [], 0
    for height, width in image_sizes.tolist():
        count = (height // patch) * (width // patch)
        x, size, members = embedded[offset:offset + count], torch.ones(count), [[p] for p in range(count)]
        rows = []
        for layer in tower.transformer.layers:
            rows.append(x.shape[0])
            attention = layer.attention
            heads, n = attention.num_heads, x.shape[0]
            h = layer.attention_norm(x)
            q, k, v = (p(h).view(n, heads, -1).transpose(0, 1) for p in (attention.q_proj, attention.k_proj,
                                                                         attention.v_proj))  # [H, n, d]
            own = offset + torch.tensor([m[0] for m in members])
            c, s = cos[own][None], sin[own][None]
            q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
            logits = q @ k.transpose(-1, -2) * attention.scaling + size.log()[None, None, :]
            attended = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(n, -1)
            x = x + attention.o_proj(attended)
            x, size, members, _ = _bipartite(x, k, size, members, torch.ones(n, dtype=torch.bool), r)
            x = x + layer.feed_forward(layer.ffn_norm(x))
        groups = []
        for row, group in enumerate(members):
            output[offset + torch.tensor(group)] = x[row]
            groups.append(sorted(offset + p for p in group))
        all_groups.append(sorted(groups))
        all_rows.append(rows)
        offset += count
    return output, all_groups, all_rows


@torch.no_grad()
def with_projector_input(model: nn.Module, inputs: dict[str, Tensor], features: Tensor) -> Tensor:
    """Logits [B, L, V] of one forward of the unmodified model whose projector reads `features` [sum P_i, C]."""
    def replace(_module: nn.Module, args: tuple) -> tuple:
        return (features, *args[1:])

    handle = model.model.multi_modal_projector.register_forward_pre_hook(replace)
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        handle.remove()


__all__ = ["tome_pixtral_features", "with_projector_input"]
