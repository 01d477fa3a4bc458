"""ToMe (Bolya et al., arXiv:2210.09461) inside the packed vision towers of GLM-4.1V/4.5V and LLaVA-OneVision-1.5,
with ToMe for Stable Diffusion's unmerge (arXiv:2303.17604) of the blocks' output; written plainly, shares no code
with policyc.

Exact semantics, one frame at a time (every block of these towers attends within its frame):
- The blocks' input and every row's rotary (cos, sin) are read from the unmodified tower's call of its first block:
  GLM has added its position grid resampled to each image; OV-1.5 has prepended one CLS row to every frame (with its
  own rotary angle) and run `pre_layernorm`. Rows are in the processor's order (the rows of `pixel_values`), frame
  after frame, each OV-1.5 frame led by its CLS row.
- Every block by hand: x = x + proj(attention), eager, within the frame, log(size) of every key added to its logits,
  q and k rotated (in float32: q cos + rotate_half(q) sin) at the row of the token's own first member (a merged group
  at its receiver's); then ToMe's bipartite matching on the block's post-rotary keys (mean over heads), as
  tests/reference/tome_unmerge.py (A = even rows, B = odd rows, r = min(r, mergeable // 2), the r best A rows fold
  into their matches by size-weighted average; the CLS row never merges); then x = x + mlp(norm2(x)). With `after`,
  the MLP runs before the matching (on the keys of the block's attention).
- Unmerge: every row takes the row of the token holding it. Then the rest of the tower by hand: GLM `post_layernorm`,
  the 2x2 `downsample` conv on each 4 consecutive rows, `merger`; OV-1.5 drops every frame's CLS row, then `merger`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reference.tome_unmerge import _bipartite


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotated(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t [T, H, d] rotated by each row's (cos, sin) [T, d]."""
    t32 = t.float()
    return (t32 * cos[:, None].float() + _rotate_half(t32) * sin[:, None].float()).to(t.dtype)


def _block_inputs(vit: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The unmodified tower's input to its first block [N, C] and the rotary (cos, sin) [N, d] of every row."""
    seen: list[tuple[Tensor, tuple[Tensor, Tensor]]] = []
    handle = vit.blocks[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0], kwargs["position_embeddings"])), with_kwargs=True)
    try:
        vit(pixel_values, grid_thw=grid_thw)
    finally:
        handle.remove()
    hidden, (cos, sin) = seen[0]
    return hidden, cos, sin


def _attend(block: nn.Module, x: Tensor, size: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """x + the block's attention over all of `x` (one frame): (x', post-rotary keys [T, H, d])."""
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).view(x.shape[0], 3, attn.num_heads, -1)
    q, k, v = _rotated(qkv[:, 0], cos, sin), _rotated(qkv[:, 1], cos, sin), qkv[:, 2]
    qs, ks, vs = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, d]
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1]) + size.log()[None, None, :]
    out = (torch.softmax(logits, dim=-1) @ vs).transpose(0, 1)
    return x + attn.proj(out.reshape(x.shape[0], -1)), k


@torch.no_grad()
def tome_packed_tower(model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, r: int, after: bool = False,
                      ) -> tuple[Tensor, list[list[list[int]]], list[list[int]]]:
    """ToMe with `r` merges per frame in every block, unmerged before what reads the blocks' output: the tower's
    `pooler_output` [T, D], each image's merged groups (sorted lists of pixel_values rows, over its frames), and each
    image's rows per block (CLS rows included)."""
    vit = model.model.visual
    cls = 1 if hasattr(vit, "cls_embeddings") else 0  # OV-1.5's RICE-ViT: one CLS row per frame
    hidden, cos, sin = _block_inputs(vit, pixel_values, grid_thw)
    output = torch.empty_like(hidden)
    patch_rows: list[int] = []  # block rows that are patches (not CLS), in order
    all_groups, all_rows, offset, pixel = [], [], 0, 0
    for t, h, w in grid_thw.tolist():
        groups, rows_per_block = [], [0] * len(vit.blocks)
        for _frame in range(t):
            n = h * w + cls
            x, size, members = hidden[offset:offset + n], torch.ones(n), [[p] for p in range(n)]
            mergeable = torch.arange(n) >= cls
            for index, block in enumerate(vit.blocks):
                rows_per_block[index] += x.shape[0]
                own = torch.tensor([offset + m[0] for m in members])
                x, keys = _attend(block, x, size, cos[own], sin[own])
                if after:
                    x = x + block.mlp(block.norm2(x))
                x, size, members, mergeable = _bipartite(x, keys.transpose(0, 1), size, members, mergeable, r)
                if not after:
                    x = x + block.mlp(block.norm2(x))
            for row, group in enumerate(members):
                output[offset + torch.tensor(group)] = x[row]
                if group[0] >= cls:
                    groups.append(sorted(pixel + p - cls for p in group))
            patch_rows += range(offset + cls, offset + n)
            offset, pixel = offset + n, pixel + n - cls
        all_groups.append(sorted(groups))
        all_rows.append(rows_per_block)
    if cls:
        return vit.merger(output[torch.tensor(patch_rows)]), all_groups, all_rows
    merge = vit.config.spatial_merge_size
    normed = vit.post_layernorm(output).view(-1, merge, merge, output.shape[-1]).permute(0, 3, 1, 2)
    return vit.merger(vit.downsample(normed).view(-1, vit.config.out_hidden_size)), all_groups, all_rows


__all__ = ["tome_packed_tower"]
