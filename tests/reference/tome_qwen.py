"""ToMe (Bolya et al., arXiv:2210.09461) inside the vision tower of Qwen2-VL and Qwen2.5-VL, with ToMe for Stable
Diffusion's unmerge (arXiv:2303.17604) before the 2x2 patch merger; written plainly, shares no code with policyc.

Exact semantics, one merge set at a time:
- Patches in the processor's order (the rows of `pixel_values`): image after image, frame after frame; in a frame
  of h x w patches the 2x2 merge groups in raster order, the 4 patches of a group in raster order. Patch p of a
  frame: group g = p // 4, q = p % 4, row = 2 * (g // (w / 2)) + q // 2, column = 2 * (g % (w / 2)) + q % 2.
- Rotary (2-D, head dim d): inv = 1 / theta ** (arange(0, d / 2, 2) / (d / 2)); angles = (row * inv, column * inv)
  concatenated, twice; q' = q cos + rotate_half(q) sin, the same for k (in float32).
- Merge sets: each frame (Qwen2-VL) or each window of a frame (Qwen2.5-VL). Windows tile the frame's grid of merge
  groups in squares of window_size / patch_size / 2 groups per side, row-major (edge windows smaller); a window's
  patches in processor order. Attention spans: the frame in full-attention blocks (every Qwen2-VL block, Qwen2.5-VL's
  `fullatt_block_indexes`), the window in the others.
- Every block by hand: x = x + proj(attention) with eager attention in each span, log(size) of every key added to
  its logits, every token rotated at its own patch's position (a merged group at its receiver's); then ToMe's
  bipartite matching in each set on the block's post-rotary keys (mean over heads), as tests/reference/tome_unmerge.py
  (A = even rows, B = odd rows, r = min(r, n // 2), the r best A rows fold into their matches by size-weighted
  average, unmerged A rows then B rows); then x = x + mlp(norm2(x)).
- Unmerge: every patch takes the row of the token that holds it. The merger runs on every patch in processor order
  (its groups are 4 consecutive rows in the processor's order as in the tower's window order), and its output
  replaces the tower's `pooler_output` in one forward of the otherwise unmodified model.
- Qwen3-VL (`tome_qwen3_tower`): the blocks' input is the patch embedding plus the learned position grid resampled to
  each image (read from the unmodified tower's input to its first block: no windows, so in processor order); after
  each block of `deepstack_visual_indexes` every patch takes the row of the token holding it then, and that level's
  DeepStack merger runs on every patch; the levels replace the tower's `deepstack_features` too (DeepStack,
  arXiv:2406.04334: the LLM adds them after its layers 0, 1, 2).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from reference.tome_unmerge import _bipartite


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotary(t: Tensor, rows: Tensor, cols: Tensor, theta: float) -> Tensor:
    """t [T, H, d] rotated at each token's (row, column)."""
    d = t.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d // 2, 2, dtype=torch.float) / (d // 2))
    angles = torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    t32 = t.float()
    return (t32 * angles.cos() + _rotate_half(t32) * angles.sin()).to(t.dtype)


def _patch_places(h: int, w: int, merge: int) -> list[tuple[int, int]]:
    places = []
    for p in range(h * w):
        group, q = divmod(p, merge * merge)
        group_row, group_col = divmod(group, w // merge)
        places.append((merge * group_row + q // merge, merge * group_col + q % merge))
    return places


def _windows(h: int, w: int, merge: int, side: int | None) -> list[list[int]]:
    """The frame's merge sets as lists of frame positions: the whole frame, or its windows of `side` groups."""
    if side is None:
        return [list(range(h * w))]
    windows = []
    for window_row in range(0, h // merge, side):
        for window_col in range(0, w // merge, side):
            windows.append([p for p, (r, c) in enumerate(_patch_places(h, w, merge))
                            if window_row <= r // merge < window_row + side
                            and window_col <= c // merge < window_col + side])
    return windows


def _attend(block: nn.Module, x: Tensor, size: Tensor, rows: Tensor, cols: Tensor, spans: list[list[int]],
            theta: float) -> tuple[Tensor, Tensor]:
    """x + the block's attention, eager, within each span of token indices: (x', post-rotary keys [T, H, d])."""
    attn = block.attn
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).view(x.shape[0], 3, heads, -1)
    q, k, v = _rotary(qkv[:, 0], rows, cols, theta), _rotary(qkv[:, 1], rows, cols, theta), qkv[:, 2]
    out = torch.zeros(x.shape[0], heads, q.shape[-1])
    for span in spans:
        index = torch.tensor(span, dtype=torch.long)
        qs, ks, vs = q[index].transpose(0, 1), k[index].transpose(0, 1), v[index].transpose(0, 1)  # [H, n, d]
        logits = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1]) + size[index].log()[None, None, :]
        out[index] = (torch.softmax(logits, dim=-1) @ vs).transpose(0, 1)
    return x + attn.proj(out.reshape(x.shape[0], -1)), k


@torch.no_grad()
def tome_qwen_tower(model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, r: int, after: bool = False,
                    ) -> tuple[Tensor, list[list[list[int]]], list[list[int]]]:
    """ToMe with `r` merges per set in every block (between attention and MLP; with `after`, after the MLP, on the
    keys of the block's attention), unmerged before the merger: the tower's `pooler_output` [T, D], each image's
    merged groups (sorted lists of pixel_values rows, over its frames), and each image's rows per block."""
    pooler, _, groups, rows = _tome(model, pixel_values, grid_thw, r, after)
    return pooler, groups, rows


@torch.no_grad()
def tome_qwen3_tower(model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, r: int, after: bool = False,
                     ) -> tuple[Tensor, list[Tensor], list[list[list[int]]], list[list[int]]]:
    """`tome_qwen_tower` on Qwen3-VL and Qwen3.5 (learned positions added to the patches): also the DeepStack features
    per level [T, D], from unmerged patches (none on Qwen3.5)."""
    return _tome(model, pixel_values, grid_thw, r, after)


def _block_input(vit: nn.Module, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
    """The unmodified tower's input to its first block [N, C] (Qwen3-VL: patches plus resampled positions)."""
    seen: list[Tensor] = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        vit(pixel_values, grid_thw=grid_thw)
    finally:
        handle.remove()
    return seen[0]


def _tome(model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, r: int, after: bool,
          ) -> tuple[Tensor, list[Tensor], list[list[list[int]]], list[list[int]]]:
    vit = model.model.visual
    config = vit.config
    merge = config.spatial_merge_size
    full_blocks = getattr(config, "fullatt_block_indexes", None)
    side = None if full_blocks is None else config.window_size // config.patch_size // merge
    theta = config.rope_parameters["rope_theta"]
    levels = list(getattr(config, "deepstack_visual_indexes", None) or [])
    # Qwen3-VL-style towers (Qwen3-VL, Qwen3.5) add learned positions resampled per image to the patches: the first
    # block's input, taken from the model; Qwen2-VL's is the patches (Qwen2.5-VL's first block sees them reordered)
    learned = hasattr(vit, "pos_embed")
    embedded = _block_input(vit, pixel_values, grid_thw) if learned else vit.patch_embed(pixel_values)
    output = torch.empty_like(embedded)
    deep = [torch.empty_like(embedded) for _ in levels]
    all_groups, all_rows, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        groups, rows_per_block = [], [0] * len(vit.blocks)
        places = _patch_places(h, w, merge)
        for _frame in range(t):
            # per set: its tokens' hidden rows, sizes and members (frame positions; members[i][0] is the token's own)
            sets = [(embedded[offset + torch.tensor(s)], torch.ones(len(s)), [[p] for p in s])
                    for s in _windows(h, w, merge, side)]
            for index, block in enumerate(vit.blocks):
                x = torch.cat([s[0] for s in sets])
                size = torch.cat([s[1] for s in sets])
                members = [m for s in sets for m in s[2]]
                own = torch.tensor([places[m[0]] for m in members])
                bounds = torch.tensor([0] + [len(s[2]) for s in sets]).cumsum(0).tolist()
                set_spans = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
                full = full_blocks is None or index in full_blocks
                spans = [list(range(x.shape[0]))] if full else set_spans
                rows_per_block[index] += x.shape[0]
                x, keys = _attend(block, x, size, own[:, 0], own[:, 1], spans, theta)
                if after:
                    x = x + block.mlp(block.norm2(x))
                new_sets = []
                for span in set_spans:
                    index_t = torch.tensor(span)
                    sx, ssize, smembers, _ = _bipartite(x[index_t], keys[index_t].transpose(0, 1), size[index_t],
                                                        [members[i] for i in span],
                                                        torch.ones(len(span), dtype=torch.bool), r)
                    new_sets.append((sx if after else sx + block.mlp(block.norm2(sx)), ssize, smembers))
                sets = new_sets
                if index in levels:  # DeepStack: this block's output, unmerged
                    for sx, _, smembers in sets:
                        for row, group in enumerate(smembers):
                            deep[levels.index(index)][offset + torch.tensor(group)] = sx[row]
            for sx, _, smembers in sets:
                for row, group in enumerate(smembers):
                    output[offset + torch.tensor(group)] = sx[row]
                    groups.append(sorted(offset + p for p in group))
            offset += h * w
        all_groups.append(sorted(groups))
        all_rows.append(rows_per_block)
    deepstack = [merger(level) for merger, level in zip(getattr(vit, "deepstack_merger_list", []), deep, strict=False)]
    return vit.merger(output), deepstack, all_groups, all_rows


@torch.no_grad()
def with_pooler_output(model: nn.Module, inputs: dict[str, Tensor], pooler: Tensor,
                       deepstack: list[Tensor] | None = None) -> Tensor:
    """Logits [B, L, V] of one forward of the unmodified model whose vision tower returns `pooler` [T, D] (and, on
    Qwen3-VL, the DeepStack features `deepstack`, [T, D] per level)."""
    def replace(_module: nn.Module, _args: tuple, output: object) -> object:
        output["pooler_output"] = pooler  # type: ignore[index]
        if deepstack is not None:
            output["deepstack_features"] = deepstack  # type: ignore[index]
        return output

    handle = model.model.visual.register_forward_hook(replace)
    try:
        return model(**inputs, use_cache=False).logits
    finally:
        handle.remove()


def groups_by_image(merged_into: Tensor, grid_thw: Tensor) -> list[list[list[int]]]:
    """Each image's merged groups (sorted lists of pixel_values rows) from [N] long: the row holding each patch."""
    result, offset = [], 0
    for t, h, w in grid_thw.tolist():
        groups: dict[int, list[int]] = {}
        for position in range(offset, offset + t * h * w):
            groups.setdefault(int(merged_into[position]), []).append(position)
        result.append(sorted(groups.values()))
        offset += t * h * w
    return result


__all__ = ["groups_by_image", "tome_qwen3_tower", "tome_qwen_tower", "with_pooler_output"]
