"""Encoder merges in Qwen2-VL's and Qwen2.5-VL's packed vision tower: ToMe (arXiv:2210.09461) inside the blocks,
undone before the patch merger (ToMe for Stable Diffusion's unmerge, arXiv:2303.17604).

The tower packs every image of a batch into one sequence of patches ([N, C]; `grid_thw` gives each image's
frames and patch grid), each frame attending only to itself; Qwen2.5-VL's blocks attend within windows of
`window_size` pixels (the tower first reorders the patches window by window) except its `fullatt_block_indexes`;
2-D rotary embeddings place every patch. After the blocks a merger folds each 2x2 group of patches (4
consecutive rows) into one LLM token.

How policyc runs encoder merges there:
- Each merge set is one frame (Qwen2-VL) or one window of one frame (Qwen2.5-VL): tokens never merge across
  images, frames or windows, so a token always lies in the window its window blocks attend within. A merge's `r`
  is per set: per window on Qwen2.5-VL.
- Blocks run as the model's own until a block has a stage; from then on policyc runs each block's parts itself
  (norm1, qkv, the model's vision rotary, attention, proj, norm2, mlp) on the live rows, packed: attention within
  each frame (full blocks) or window (window blocks), with log(size) added to every key's logit after a
  proportional merge, each row keeping the rotary embedding of its own patch (a merged group: its receiver's).
- The `keys` a merge reads are the block's post-rotary keys (what its attention uses), mean over heads.
- Before the merger every patch takes the row its token was merged into, so the merger, the LLM's token count and
  its M-RoPE positions are the model's own: ToMe saves encoder compute only. The tower's `last_hidden_state` is
  unmerged too (in the tower's block order, as the model returns it).
- Sets of equal size run a stage together, as one batch with no padding row, so bipartite's r is each set's own.
- `ImageStages.merged_into` is [N] long over the rows of `pixel_values` (the processor's order): the row whose token
  holds each patch; `encoder_rows` [images, blocks] the rows each image ran on (the compile report's FLOPs).

Other packed towers (models/glm4v.py, models/llava_onevision1_5.py) set on their adapter:
- `unmerge_after_blocks`: something other than the merger reads the blocks' output first (GLM's post_layernorm and
  2x2 downsample conv; OV-1.5's per-frame CLS strip), so the last block returns every row unmerged, and the tower's
  `last_hidden_state` (computed from those rows) stays the model's.
- `frame_cls`: each frame's rows start with a CLS token (LLaVA-OneVision-1.5's RICE-ViT; `cu_seqlens` counts it):
  it is part of its frame's attention span and merge set but never merges (not `vision`; the `cls` set).
"""

from __future__ import annotations

import itertools
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.vision_utils import get_vision_window_index

from policyc.compiler.plan import BoundStage, Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.runtime.evaluate import Captured, PrefillState
from policyc.runtime.patching import LayerWrapper
from policyc.runtime.vision_evaluate import VisionEvaluator
from policyc.runtime.vision_tokens import Tokens, compact, run_statements

if TYPE_CHECKING:
    from policyc.runtime.vision import ImageStages

_FEATURES = ("keys", "hidden")


def refuse_unpacked(plan: Plan) -> None:
    """What the packed encoder runs so far is `merge bipartite` (ToMe) by keys or hidden: any other encoder
    statement fails at its line (after `refuse_unmergeable`, which refuses drops, protect and encoder.output)."""
    family = plan.adapter.family
    problems = []
    for stage in (s for s in plan.stages if s.kind == "encoder" and s.point != "encoder.output"):
        for statement in stage.statements:
            if isinstance(statement, ir.Keep | ir.Drop | ir.Protect):
                continue  # refused with its reason by refuse_unmergeable
            by = statement.by if isinstance(statement, ir.Merge) else None
            feature = stage.values.get(by.id, by) if isinstance(by, ir.Name) else by
            if isinstance(statement, ir.Merge) and statement.method == "bipartite" and isinstance(
                    feature, ir.Name) and feature.id in _FEATURES:
                continue
            problems.append(PolicyError.at(
                f"{family}'s packed encoder (images in one sequence, windows on Qwen2.5-VL) runs `merge bipartite "
                f"... by keys` (ToMe) in encoder stages so far; this statement of {stage.label} is not implemented "
                "there yet", statement.span,
                "merge bipartite(r=..., proportional=true) of vision by keys (tome), or drop at projector.output "
                "(e.g. divprune) or in the LLM (e.g. fastv)"))
    if problems:
        raise PolicyError([d for p in problems for d in p.diagnostics])


@dataclass
class PackedRun:
    """One forward of the tower: each merge set's live rows (in the tower's block order, set after set)."""

    tokens: list[Tokens]  # per set, one image row each ([1, R, C]); positions are the set's own (0..P-1)
    starts: list[int]  # each set's first position in the block order
    frames: list[int]  # each set's frame: full-attention blocks attend within it
    images: list[int]  # each set's image (row of grid_thw)
    position: tuple[torch.Tensor, torch.Tensor]  # the tower's rotary (cos, sin) per block-order position [N, d]
    order: torch.Tensor  # [N] long: the pixel_values row at each block-order position (-1: a frame's CLS row)
    image_count: int  # rows of grid_thw
    changed: bool = False  # a stage ran: blocks run on the live rows
    proportional: bool = False  # a merge asked for log(size) attention biases
    query: torch.Tensor | None = None  # [N, H, d] this block's queries, at the block-order positions of live rows
    key: torch.Tensor | None = None
    scaling: float = 1.0  # the block's attention scale
    unmerged: torch.Tensor | None = None  # [N, C] what the merger read
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [images] live rows

    def counts(self) -> list[int]:
        return [t.origin.shape[1] for t in self.tokens]

    def positions(self) -> torch.Tensor:
        """[N'] long: the block-order position of every live row, set after set."""
        return torch.cat([start + t.origin[0] for start, t in zip(self.starts, self.tokens, strict=True)])

    def spans(self, full: bool) -> list[int]:
        """Rows per attention span: each frame (full blocks) or set (window blocks), in order."""
        if not full:
            return self.counts()
        per_frame: dict[int, int] = defaultdict(int)
        for frame, count in zip(self.frames, self.counts(), strict=True):
            per_frame[frame] += count
        return list(per_frame.values())


class PackedBlock(LayerWrapper):
    """A vision block of the packed tower: the model's own until a stage changes the tokens, then its parts on the
    live rows, with the stages at `encoder.layer[i].attention` (between attention and MLP) and `encoder.layer[i]`."""

    def __init__(self, inner: nn.Module, index: int, owner: PackedEncoder) -> None:
        super().__init__(inner, index)
        self.owner = owner
        self.inside = owner.stages.stages_at("encoder.layer.attention", index)
        self.after = owner.stages.stages_at("encoder.layer", index)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: object) -> torch.Tensor:
        owner = self.owner
        if self.index == 0:
            owner.begin(hidden_states, position_embeddings)
        run = owner.run
        if run is None:
            return self.inner(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        run.rows[self.index] = torch.zeros(run.image_count, dtype=torch.long).index_add_(
            0, torch.tensor(run.images), torch.tensor(run.counts()))
        if not (run.changed or self.inside or self.after):
            return self.inner(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        block = self.inner
        hidden = owner.attend(block, self.index, hidden_states)
        if self.inside:
            hidden = owner.apply(self.inside, hidden, self.index)
        hidden = hidden + block.mlp(block.norm2(hidden))
        if self.after:
            hidden = owner.apply(self.after, hidden, self.index)
        if owner.after_blocks and self.index == len(owner.adapter.vision_layers) - 1:
            run.unmerged = owner._unmerge(run, hidden)  # every row, for what reads the blocks' output
            return run.unmerged
        return hidden


class PackedEncoder:
    """The encoder stages of a plan on a packed Qwen tower (built at compile time: refuses what it cannot run)."""

    def __init__(self, stages: ImageStages) -> None:
        refuse_unpacked(stages.plan)
        self.stages = stages
        self.adapter = adapter = stages.adapter
        tower = adapter.vision_tower
        self.tower = tower
        config = tower.config
        self.merge = int(config.spatial_merge_size)
        self.full_blocks = getattr(config, "fullatt_block_indexes", None)  # None: every block attends to its frame
        self.after_blocks = bool(getattr(adapter, "unmerge_after_blocks", False))
        self.frame_cls = int(bool(getattr(adapter, "frame_cls", False)))  # rows before each frame's patches
        self.run: PackedRun | None = None
        self._grid: torch.Tensor | None = None
        self._wrapped: list[tuple[int, nn.Module]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        adapter = self.adapter
        for index, inner in enumerate(adapter.vision_layers):
            adapter.vision_layers[index] = PackedBlock(inner, index, self)
            self._wrapped.append((index, inner))
        self._handles.append(self.tower.register_forward_pre_hook(self._on_tower_input, with_kwargs=True))
        if not self.after_blocks:
            self._handles.append(adapter.projector.register_forward_pre_hook(self._on_merger_input))
        for merger in adapter.deepstack_mergers:  # Qwen3-VL: they too fold 4 consecutive patches
            self._handles.append(merger.register_forward_pre_hook(self._on_deepstack_input))
        self._handles.append(self.tower.register_forward_hook(self._on_tower_output))

    def remove(self) -> None:
        for index, inner in self._wrapped:
            self.adapter.vision_layers[index] = inner
        for handle in self._handles:
            handle.remove()
        self._wrapped.clear()
        self._handles.clear()
        self.run = None

    # ---------------------------------------------------------------- one forward
    def _on_tower_input(self, module: nn.Module, args: tuple, kwargs: dict[str, object]) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if not isinstance(grid, torch.Tensor):
            raise PolicyError.at("Qwen's vision tower ran without grid_thw", None)
        self._grid = grid

    def begin(self, hidden: torch.Tensor, position: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The merge sets of this forward: frames, or windows of frames (Qwen2.5-VL), in the tower's block order."""
        grid, device = self._grid, hidden.device
        if grid is None or position is None:
            raise PolicyError.at("Qwen's vision blocks ran without grid_thw or rotary embeddings", None)
        patches = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).tolist()
        frame_sizes = [size + self.frame_cls for size in patches]
        frame_image = torch.repeat_interleave(torch.arange(len(grid)), grid[:, 0].cpu()).tolist()
        unit = self.merge**2
        if self.full_blocks is None:
            bounds = torch.tensor([0, *frame_sizes]).cumsum(0).tolist()
            order = torch.arange(hidden.shape[0], device=device)
            if self.frame_cls:  # each frame's CLS row has no pixel_values row
                pixel_rows = torch.tensor([0, *patches]).cumsum(0).tolist()
                order = torch.cat([torch.arange(start - 1, end, device=device)
                                   for start, end in itertools.pairwise(pixel_rows)])
                order[torch.tensor(bounds[:-1], device=device)] = -1
        else:
            config = self.tower.config
            window_index, cu_windows = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                                               window_size=config.window_size,
                                                               patch_size=config.patch_size)
            bounds = cu_windows.tolist()
            order = (window_index.to(device)[:, None] * unit + torch.arange(unit, device=device)).flatten()
        frame_ends = torch.tensor(frame_sizes).cumsum(0)
        starts = bounds[:-1]
        frames = [int(torch.searchsorted(frame_ends, start, right=True)) for start in starts]
        tokens = [Tokens.start(hidden[None, start:end]) for start, end in itertools.pairwise(bounds)]
        self.run = PackedRun(tokens, starts, frames, [frame_image[f] for f in frames], position, order, len(grid))

    def attend(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + the block's attention on the live rows [N', C]: within frames or windows, each row at its own
        patch's rotary embedding, log(size) added to the keys' logits after a proportional merge."""
        run = self.run
        assert run is not None  # begin() ran at block 0
        attention = block.attn
        positions = run.positions()
        cos, sin = (e[positions] for e in run.position)
        rows = hidden.shape[0]
        q, k, v = attention.qkv(block.norm1(hidden)).reshape(rows, 3, attention.num_heads, -1).permute(
            1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        size = torch.cat([t.size[0] for t in run.tokens])
        bias = size.log().to(q.dtype) if run.proportional else None
        full = self.full_blocks is None or index in self.full_blocks
        outputs, start = [], 0
        for length in run.spans(full):
            span = slice(start, start + length)
            mask = None if bias is None else bias[span][None, None, None, :]
            out = nn.functional.scaled_dot_product_attention(
                q[span].transpose(0, 1)[None], k[span].transpose(0, 1)[None], v[span].transpose(0, 1)[None],
                attn_mask=mask, scale=attention.scaling)
            outputs.append(out[0].transpose(0, 1))
            start += length
        run.scaling = float(attention.scaling)
        run.query = q.new_zeros(run.order.shape[0], *q.shape[1:]).index_copy(0, positions, q)
        run.key = k.new_zeros(run.order.shape[0], *k.shape[1:]).index_copy(0, positions, k)
        return hidden + attention.proj(torch.cat(outputs).reshape(rows, -1))

    def apply(self, stages: list[BoundStage], hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Run `stages` on the live rows `hidden` [N', C]; returns the rows left, packed."""
        for stage in stages:
            hidden = self._stage(stage, hidden, layer)
        return hidden

    def _stage(self, stage: BoundStage, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        run = self.run
        assert run is not None and run.query is not None and run.key is not None
        pieces = list(torch.split(hidden, run.counts()))
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # sets of one size run as one batch
        for index, tokens in enumerate(run.tokens):
            groups[(tokens.owner.shape[1], tokens.origin.shape[1])].append(index)
        for (width, _), members in groups.items():
            stacked = [run.tokens[s] for s in members]
            tokens = Tokens(torch.stack([pieces[s] for s in members]), *(torch.cat([getattr(t, name) for t in stacked])
                            for name in ("origin", "first", "size", "owner")))
            at = torch.stack([run.starts[s] + t.origin[0] for s, t in zip(members, stacked, strict=True)])
            captured = Captured(run.query[at].transpose(1, 2), run.key[at].transpose(1, 2), run.scaling)
            cls = torch.zeros(len(members), width, dtype=torch.bool, device=hidden.device)
            cls[:, :self.frame_cls] = True  # OV-1.5: the frame's CLS row, first; never a merge candidate
            image = ~cls
            state = PrefillState(image, torch.zeros_like(image).scatter(1, tokens.origin, True), tokens.origin,
                                 torch.zeros_like(image))
            evaluator = VisionEvaluator(state, captured, dict(stage.values), seed_offset=layer, causal=False,
                                        hidden=tokens.hidden, cls=cls,
                                        patches=(torch.arange(width, device=hidden.device) - self.frame_cls).expand(
                                            len(members), -1),
                                        layer_count=len(self.adapter.vision_layers), layer=layer,
                                        stage_layers=stage.layers or (layer,), label=stage.label)
            tokens, alive, order, proportional = run_statements(stage, evaluator, tokens)
            tokens = compact(tokens, state, alive, order)
            run.proportional = run.proportional or proportional
            for row, (s, count) in enumerate(zip(members, state.valid.sum(1).tolist(), strict=True)):
                run.tokens[s] = Tokens(tokens.hidden[row:row + 1, :count], tokens.origin[row:row + 1, :count],
                                       tokens.first[row:row + 1, :count], tokens.size[row:row + 1, :count],
                                       tokens.owner[row:row + 1])
                pieces[s] = tokens.hidden[row, :count]
        run.changed = True
        return torch.cat(pieces)

    # ---------------------------------------------------------------- the merger and the tower's output
    def _on_merger_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Every patch takes the row its token was merged into: the merger reads [N, C] in the block order."""
        run = self.run
        if run is None or not run.changed:
            return None
        run.unmerged = self._unmerge(run, args[0])
        return (run.unmerged, *args[1:])

    def _on_deepstack_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """A DeepStack merger (Qwen3-VL) reads its block's output [N', C] unmerged to [N, C], by the merges so far."""
        run = self.run
        if run is None or not run.changed:
            return None
        return (self._unmerge(run, args[0]), *args[1:])

    @staticmethod
    def _unmerge(run: PackedRun, hidden: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(hidden, run.counts())
        return torch.cat([t.unmerged(piece[None])[0] for t, piece in zip(run.tokens, pieces, strict=True)])

    def _on_tower_output(self, module: nn.Module, args: tuple, output: object) -> object:
        run = self.run
        if run is None:
            return output
        self.run = None
        if run.unmerged is not None and not self.after_blocks:
            output["last_hidden_state"] = run.unmerged  # type: ignore[index]
        holder = torch.cat([start + t.owner[0] for start, t in zip(run.starts, run.tokens, strict=True)])
        patch = run.order >= 0  # (OV-1.5's CLS rows never merge, and hold no patch)
        merged_into = torch.empty(int(patch.sum()), dtype=run.order.dtype, device=run.order.device)
        merged_into[run.order[patch]] = run.order[holder[patch]]
        self.stages.merged_into = merged_into
        self.stages.encoder_rows = torch.stack([run.rows[k] for k in range(len(self.adapter.vision_layers))], 1)
        return output


__all__ = ["PackedBlock", "PackedEncoder", "refuse_unpacked"]
