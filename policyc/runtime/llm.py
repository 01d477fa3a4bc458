"""The LLM's runtime state during one request: which prompt rows each decoder layer keeps, the
stages' evaluation at their layers, the tokens dropped before the LLM, and the position ids and
decode masks that follow from them. The layer wrappers (compiled.py) and the graph backends'
operators (ops.py) call into it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from policyc.compiler.plan import BoundStage, Plan
from policyc.errors import PolicyError, Span
from policyc.kernels import KERNELS
from policyc.lang import ir
from policyc.passes import MERGE_OPS
from policyc.passes.merges import MergeRows
from policyc.runtime.evaluate import Captured, PrefillState, StageEvaluator
from policyc.runtime.guards import check_kept, check_protected
from policyc.runtime.image_samples import placeholder_flags
from policyc.runtime.row_folds import RowFold
from policyc.runtime.rows import valid_keys

if TYPE_CHECKING:
    from policyc.runtime.cache import CacheRuntime


class ImageSource(Protocol):
    """What the pre-LLM stages (encoder, projector) leave for the LLM after a vision forward: per image
    slot (I images in the order LLaVA scatters them, N tokens each), whether it reaches the LLM and
    whether a stage protected it. None when no vision forward ran since the last prefill took them."""

    kept: torch.Tensor | None  # [I, N] bool; [T] over the packed tokens where images have their own sizes
    protected: torch.Tensor | None  # same shape as kept
    # Optionally `by_placeholder`: per placeholder id, the flags of the forward that encoded those placeholders,
    # where images and videos are encoded apart (ImageStages, vision.py; image_samples.placeholder_flags).


@dataclass
class Runtime:
    """Per-model runtime state shared by the hooks and layer wrappers."""

    plan: Plan
    compact: bool = False  # `positions compact` or `cache_length`: kept rows are renumbered 0..n-1 in prefill
    # `positions cache_length` (MustDrop, SparseVLM v1): a decode token's position in a layer is the real tokens
    # that layer's cache holds (after `cache regather`), not the prompt's stage-consistent numbering.
    cache_length: bool = False
    rates_text: bool = False  # a stage reads SparseVLM's `raters`: computed from the embeddings before layer 0
    state: PrefillState | None = None
    captured: dict[int, Captured] = field(default_factory=dict)
    kept_at_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # prefill rows each layer cached
    # Per layer, which of those rows were tokens rather than fillers ([B, L'] bool; None: all were).
    live_at_layer: dict[int, torch.Tensor | None] = field(default_factory=dict)
    images: ImageSource | None = None  # set when the plan has encoder or projector stages
    # After image tokens were dropped before the LLM: the position id of every prompt position in the
    # shorter prompt the LLM sees ([B, L]), and how many real tokens each sample lost ([B]).
    base_positions: torch.Tensor | None = None
    dropped_before: torch.Tensor | None = None
    steps: int = 0  # decode steps since the prefill
    # `steps` as a tensor on the model's device ([] long): what decode code reads under a static cache, so that
    # transformers' compiled decode step sees a changing value, not a constant to recompile for
    step: torch.Tensor | None = None
    static: bool = False  # the current generate() uses a static cache
    graphs: bool = False  # the graph backends: prefill stages run as graph passes, not in the layer wrappers
    cache: CacheRuntime | None = None  # the decode stage's cache policy (None: `cache full`)
    stages_ran: set[int] = field(default_factory=set)  # decoder layers whose stages ran in this prefill
    # The kept and protected image slots ([I, N] bool each) the last prefill took from the pre-LLM stages.
    image_slots: tuple[torch.Tensor, torch.Tensor | None] | None = None
    # The prefill's masks per layer type ([B, 1, L, W] each, or None: causal), where the decoder takes a mapping
    # (Gemma 3: bidirectional image blocks in every layer, sliding windows in some); None: plain causal masks.
    layer_masks: dict[str, torch.Tensor | None] | None = None
    prompt_ids: torch.Tensor | None = None  # the prefill's input_ids [B, L]: which placeholder each visual token is

    def start_prefill(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | Mapping[str, torch.Tensor | None] | None) -> None:
        image = self.plan.adapter.visual_mask(input_ids)
        valid = valid_keys(attention_mask, input_ids) if attention_mask is not None else torch.ones_like(image)
        kept = torch.arange(image.shape[1], device=image.device).expand(image.shape[0], -1)
        self.state = PrefillState(image, valid, kept, torch.zeros_like(image),
                                  images=self.plan.adapter.image_index(input_ids))
        self.captured.clear()
        self.kept_at_layer.clear()
        self.live_at_layer.clear()
        self.base_positions = self.dropped_before = self.image_slots = self.layer_masks = None
        self.steps = -1  # the prefill's own forward is not a decode step
        if self.step is None or self.step.device != input_ids.device:
            self.step = torch.full((), -1, dtype=torch.long, device=input_ids.device)
        self.step.fill_(-1)
        self.prompt_ids = input_ids
        self.stages_ran.clear()

    def drop_before_llm(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drop the image rows the pre-LLM stages did not keep, from the embeddings [B, L, D] -> [B, L', D].

        Equivalent to a prompt whose `<image>` runs hold only the kept tokens: the kept rows are
        renumbered contiguously over real tokens, and decode positions shift by the tokens lost.
        """
        images, state = self.images, self.state
        if images is None or state is None or images.kept is None:
            return hidden
        slots, protected = images.kept, images.protected
        parts = getattr(images, "by_placeholder", None)
        if parts and self.prompt_ids is not None:  # images and videos from their own forwards
            slots, protected = placeholder_flags(self.prompt_ids[state.image], slots, protected, parts)
            parts.clear()
        images.kept = images.protected = None  # taken: a later prompt needs a fresh vision forward
        self.image_slots = (slots, protected)
        if not bool(state.image.any()):
            return hidden
        found, expected = int(state.image.sum()), slots.numel()
        if found != expected:
            shape = " x ".join(map(str, slots.shape))
            raise PolicyError.at(f"the prompt holds {found} image tokens but the images gave {shape} = {expected} "
                                 "(one vision forward per prompt is expected)", self._first_image_stage_span())
        keep = ~state.image
        keep[state.image] = slots.flatten().to(keep.device)
        if protected is not None:
            state.protected = state.protected.clone()
            state.protected[state.image] = protected.flatten().to(keep.device)
        if bool(keep.all()):
            return hidden
        counts = keep.sum(1)
        # A sample keeping fewer tokens than the widest one carries its earliest dropped rows on as fillers.
        rows = KERNELS["kept_rows"](keep, int(counts.max()))
        check_kept(rows, state.length, "the stages before the LLM", self._first_image_stage_span())
        if protected is not None:
            check_protected(state.protected & state.valid, keep, "the stages before the LLM",
                            self._first_image_stage_span())
        state.kept = rows
        if not bool((counts == counts[0]).all()):
            state.dead = ~keep
        if self.plan.adapter.rope == "1d":  # M-RoPE: kept tokens keep their 3-D positions (models/qwen2_vl.py)
            self.base_positions = (state.valid & keep).long().cumsum(1).sub(1).clamp(min=0)
        self.dropped_before = (state.valid & ~keep).sum(1)
        return torch.gather(hidden, 1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))

    def select(self, index: int, stages: list[BoundStage], hidden: torch.Tensor, captured: Captured | None,
               position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Evaluate the `stages` bound to decoder layer `index` on its output `hidden` [B, L', D]; returns
        the rows that stay, [B, n] indices into the current rows in order, and narrows `state.kept`.
        (The graph backends' entry: they run no merges, support.py rejects those.)"""
        return self.evaluate(index, stages, hidden, captured, position_embeddings)[0]

    def apply_stages(self, index: int, stages: list[BoundStage], hidden: torch.Tensor, captured: Captured | None,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The eager wrappers' entry: the layer output narrowed to the rows that stay, merges applied, [B, n, D]."""
        rows, hidden = self.evaluate(index, stages, hidden, captured, position_embeddings)
        return torch.gather(hidden, 1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))

    def evaluate(self, index: int, stages: list[BoundStage], hidden: torch.Tensor, captured: Captured | None,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows that stay ([B, n] indices into the current rows) and the current rows' hidden states with
        the stages' merges applied ([B, L', D]); narrows `state.kept`."""
        state = self.state
        assert state is not None  # stages run inside a prefill
        alive = state.alive()  # padding is no image token: every stage keeps it (it stays masked)
        last = index + 1 >= len(self.plan.adapter.decoder_layers)
        for stage in stages:
            step = stage.layers.index(index)
            if step == 0:  # N0 of the stage's schedules: the image tokens alive before its first layer
                state.origins[stage.label] = (state.image & alive & state.valid).sum(1)
            evaluator = StageEvaluator(state, captured, dict(stage.values), seed_offset=index, step=step,
                                       steps=len(stage.layers), origin=state.origins.get(stage.label),
                                       previous_layer=lambda: self.previous_layer(index))
            alive, hidden = _run_statements(stage.statements, evaluator, alive, hidden,
                                            None if last else self._next_layer(index, position_embeddings))
        keep_rows = torch.gather(alive, 1, state.kept)  # [B, L'] which current rows survive
        counts = keep_rows.sum(1)
        ragged = not bool((counts == counts[0]).all())
        if ragged and self.graphs:
            raise PolicyError.at(f"layer {index} keeps {counts.tolist()} tokens across the batch; the graph "
                                 "backends need every sample to keep the same count", stages[0].span,
                                 "compile with backend='eager', or use a fixed amount (top N or N%)",
                                 ).with_sources(dict(self.plan.checked.sources))
        # A sample keeping fewer rows than the widest one carries its earliest dropped rows on as fillers.
        rows = KERNELS["kept_rows"](keep_rows, int(counts.max()))
        state.kept = torch.gather(state.kept, 1, rows)
        if ragged or state.dead is not None:
            state.dead = ~alive
        where = f"stage '{stages[-1].label}' at LLM layer {index}"
        check_kept(state.kept, state.length, where, stages[-1].span)
        check_protected(state.protected & state.valid, alive, where, stages[-1].span)
        return rows, hidden

    def previous_layer(self, index: int) -> tuple[Captured, torch.Tensor, torch.Tensor]:
        """Layer `index - 1`'s recorded queries and keys, the original position of each of its rows [B, R] and
        which rows were keys [B, R] (real tokens, not padding or fillers), for `attention(layer=previous)`."""
        captured, rows = self.captured.get(index - 1), self.kept_at_layer.get(index - 1)
        if captured is None or rows is None:
            raise PolicyError.at(f"attention(layer=previous) at LLM layer {index} needs layer {index - 1}'s "
                                 "attention, which was not recorded", None)
        assert self.state is not None  # stages run inside a prefill
        keys = torch.gather(self.state.valid, 1, rows)
        live = self.live_at_layer.get(index - 1)
        return captured, rows, keys if live is None else keys & live

    def _next_layer(self, index: int, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    ) -> Callable[[torch.Tensor], Captured]:
        """The next layer's recomputed queries and keys of given hidden states, computed once per hidden tensor
        (`attention(layer=next)` and `keys(layer=next)` of one stage share them; a merge makes new ones)."""
        memo: dict[int, tuple[torch.Tensor, Captured]] = {}

        def capture(hidden: torch.Tensor) -> Captured:
            held = memo.get(0)
            if held is None or held[0] is not hidden:
                held = memo[0] = (hidden, self.next_layer_capture(index, hidden, position_embeddings))
            return held[1]
        return capture

    def next_layer_capture(self, index: int, hidden: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> Captured:
        """Post-RoPE queries and keys of `hidden` through layer `index + 1`'s input norm, q/k projections and
        rotary, at the current rows' positions (PyramidDrop's lightweight attention, arXiv:2410.17247)."""
        adapter = self.plan.adapter
        layer = adapter.decoder_layers[index + 1]
        layer = getattr(layer, "inner", layer)  # unwrap a policyc layer wrapper
        attention = adapter.decoder_attention[index + 1]
        normed, shape = layer.input_layernorm(hidden), (*hidden.shape[:2], -1, adapter.head_dim)
        query = attention.q_proj(normed).view(*shape[:2], adapter.num_heads, -1)[..., :adapter.head_dim]  # (Qwen3.5:
        query = query.transpose(1, 2)  # its query, then its output gate per head)
        key = attention.k_proj(normed).view(shape).transpose(1, 2)
        if isinstance(getattr(attention, "q_norm", None), torch.nn.Module):  # Gemma 3, Qwen 3: per-head norms
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = position_embeddings
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        query, key = rotate(query, key, cos, sin)
        return Captured(query, key, float(attention.scaling), self.model_visible(index + 1))

    def model_visible(self, index: int) -> torch.Tensor | None:
        """[B, L', L'] bool: which current row may attend to which, by decoder layer `index`'s own prefill mask
        (Gemma 3: causal or within one image's block, within the window on sliding layers); None where the layers
        take a plain causal mask."""
        state, layer_type = self.state, self.plan.adapter.layer_type(index)
        if state is None or self.layer_masks is None or layer_type is None:
            return None
        mask = self.layer_masks.get(layer_type)
        if mask is None:  # transformers skipped a purely causal mask
            return None
        mask = mask[:, 0, :, : state.length]
        allowed = mask if mask.dtype == torch.bool else mask == 0
        rows = state.kept
        allowed = torch.gather(allowed.expand(rows.shape[0], -1, -1), 1,
                               rows[:, :, None].expand(-1, -1, state.length))
        return torch.gather(allowed, 2, rows[:, None, :].expand(-1, rows.shape[1], -1))

    def full_decode_mask(self, like: torch.Tensor | None, static: bool) -> torch.Tensor | None:
        """The decode step's mask over every original position, [B, 1, 1, W]: the prompt's padding, then
        the generated tokens. W = L + t + 1, or a static cache's slot count (its unfilled tail masked).

        transformers sizes and offsets its decode masks by layer 0's cache; once image tokens were dropped
        before the LLM that cache is shorter than the prompt, so the mask is rebuilt from the prefill's
        padding. Same format as `like`: boolean, or additive floats."""
        state = self.state
        assert state is not None  # decoding follows a prefill
        if static and like is not None:  # the width is fixed; the step is a tensor (no recompile per step)
            columns = torch.arange(like.shape[-1], device=state.valid.device)
            generated = (columns >= state.length) & (columns <= state.length + self.step)
            prompt = torch.nn.functional.pad(state.valid, (0, like.shape[-1] - state.length))
            return _like((prompt | generated)[:, None, None, :], like)
        if not static and bool(state.valid.all()):
            return None  # no padding: a one-token query may see every cached key
        width = state.length + self.steps + 1
        allowed = torch.ones(state.valid.shape[0], width, dtype=torch.bool, device=state.valid.device)
        allowed[:, : state.length] = state.valid
        return _like(allowed[:, None, None, :], like)

    def advance(self) -> None:
        """One more decode step (called outside compiled code)."""
        self.steps += 1
        if self.step is not None:
            self.step.fill_(self.steps)

    def window(self, index: int) -> int | None:
        """The sliding window of decoder layer `index` where layers differ in their masks (Gemma 3's local
        layers); None: the layer attends to its whole prefix."""
        if not self.plan.adapter.layer_types:
            return None
        window = getattr(self.plan.adapter.decoder_attention[index], "sliding_window", None)
        return window if isinstance(window, int) else None

    def layer_decode_mask(self, window: int | None, like: torch.Tensor | None) -> torch.Tensor:
        """A decode step's mask over every original position, [B, 1, 1, L + t + 1]: the prompt's padding blocked,
        and with a sliding `window` the keys more than `window - 1` positions back (transformers' `kv > q - window`).
        Same format as `like` (boolean, or additive floats)."""
        state = self.state
        assert state is not None  # decoding follows a prefill
        width = state.length + self.steps + 1
        allowed = torch.ones(state.valid.shape[0], width, dtype=torch.bool, device=state.valid.device)
        allowed[:, : state.length] = state.valid
        if window is not None:
            allowed &= torch.arange(width, device=allowed.device) > width - 1 - window
        return _like(allowed[:, None, None, :], like)

    def rate_text(self, hidden: torch.Tensor) -> None:
        """SparseVLM's raters (arXiv:2410.04417; algorithms.md §9b), once per prompt from the LLM's input
        embeddings [B, L', D]: with V the image rows and T the text rows after the first image,
        M = softmax(V Tᵀ over T).mean(over V), and the raters are the text tokens whose M is above its mean.
        Stored as the token set `raters`, [B, L] over original positions."""
        state = self.state
        assert state is not None  # runs at the start of a prefill
        rows = state.kept
        positions = torch.arange(state.length, device=rows.device)
        first_image = torch.where(state.image, positions, state.length).amin(1, keepdim=True)
        image = torch.gather(state.image & state.valid, 1, rows)
        text = torch.gather(state.valid & ~state.image & (positions > first_image), 1, rows)
        raters = torch.zeros_like(state.image)
        for b in range(rows.shape[0]):
            vision, words = hidden[b, image[b]].float(), hidden[b, text[b]].float()
            if vision.shape[0] and words.shape[0]:
                relevance = torch.softmax(vision @ words.T, dim=-1).mean(0)  # [T]
                raters[b, rows[b, text[b]][relevance > relevance.mean()]] = True
        state.sets["raters"] = raters

    def decode_shift(self, index: int) -> torch.Tensor | None:
        """How far decoder layer `index` moves a decode token's position back, [B] (None: not at all).

        transformers numbers the new token after every real prompt token. `positions compact` subtracts the
        real tokens this layer no longer sees (PyramidDrop's stage-consistent shift); `positions cache_length`
        the real prompt tokens missing from this layer's cache, so the token sits right after what the cache
        holds (MustDrop's `get_usable_length(layer_idx)`); tokens dropped before the LLM always shift.
        """
        state = self.state
        assert state is not None  # decoding follows a prefill
        if self.plan.adapter.rope == "mrope":  # kept tokens keep their 3-D positions, and transformers numbers a
            return None  # decode token after every prompt token already (M-RoPE: models/qwen2_vl.py)
        kept = self.kept_at_layer.get(index)
        if self.cache_length:
            if self.cache is not None and self.cache.handles(index):
                held = self.cache.prompt_tokens(index)
            elif kept is not None:
                held = self.real_rows(index).sum(1)
            else:
                return None
            return state.valid.sum(1) - held
        if kept is None or not self.shorter(index):
            return None
        if self.compact:
            return state.valid.sum(1) - self.real_rows(index).sum(1)
        return self.dropped_before

    def shorter(self, index: int) -> bool:
        """Whether decoder layer `index` processed fewer tokens than the prompt's (it has a wrapper)."""
        assert self.state is not None
        kept = self.kept_at_layer.get(index)
        return kept is not None and (kept.shape[1] < self.state.length or self.live_at_layer.get(index) is not None)

    def real_rows(self, index: int) -> torch.Tensor:
        """[B, L'] bool: which rows layer `index` processed in prefill were real tokens (no padding, no filler)."""
        assert self.state is not None
        real = torch.gather(self.state.valid, 1, self.kept_at_layer[index])
        live = self.live_at_layer.get(index)
        return real if live is None else real & live

    def _first_image_stage_span(self) -> Span | None:
        return next((s.span for s in self.plan.stages if s.kind in ("encoder", "projector")), None)


def _like(allowed: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """A boolean mask `allowed` in the format of `like`: boolean, or additive floats (blocked: the dtype's min)."""
    if like is None or like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed.to(like.device), torch.finfo(like.dtype).min)


def _run_statements(statements: tuple[ir.Statement, ...], evaluator: StageEvaluator, alive: torch.Tensor,
                    hidden: torch.Tensor, next_layer: Callable[[torch.Tensor], Captured] | None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    start = alive
    for statement in statements:  # `positions` acts in the layer wrappers; support.py rejects the rest
        evaluator.next_layer = None if next_layer is None else (lambda h=hidden: next_layer(h))
        evaluator.hidden = hidden  # the `hidden` features: the layer's output, merges applied
        evaluator.state.sets["dropped"] = start & ~alive  # what the stage's earlier statements removed
        if isinstance(statement, ir.Merge):
            alive, hidden = merge_rows(statement, evaluator, alive, hidden)
            continue
        applied = evaluator.apply(statement, alive)
        alive = alive if applied is None else applied
    return alive, hidden


def merge_rows(merge: ir.Merge, evaluator: StageEvaluator, alive: torch.Tensor, hidden: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A merge in the LLM, on the layer output `hidden` [B, L', D]; returns the tokens alive afterwards ([B, L]
    bool) and `hidden` with the merged rows. Every group keeps its receiver's row, so the sequence keeps its order.
    - `merge nearest(combine=add_mean) of SET into TARGETS by FEATURES` (VisionDrop, arXiv:2506.22283): each row
      of SET that is no target folds into a target, which becomes itself plus the mean of the rows folded in.
    - `merge cluster(...) of SET by FEATURES` (SparseVLM's recycling, arXiv:2410.04417): SET may hold tokens the
      stage dropped; each cluster's rows average into its centre's row, which comes back; the others are gone."""
    state = evaluator.state
    op = MERGE_OPS[merge.method]
    members = evaluator.set(merge.source) & (state.valid if op.recycles else alive)
    receivers = (evaluator.set(merge.into) if merge.into is not None else members) & alive
    features = evaluator.features(merge.by) if merge.by is not None else None
    kept = state.kept
    rows = MergeRows((members & ~state.protected).gather(1, kept), receivers.gather(1, kept), features, None)
    folding = op.fold(merge, rows, evaluator)
    into = folding.into
    if folding.combine == "mean" and op.recycles and folding.fused is not None:
        fold = RowFold(kept, into, folding.fused, "mean")
        heads = fold.received()
        gone = torch.zeros_like(alive).scatter(1, kept, folding.fused & ~heads)
        alive = (alive & ~gone) | torch.zeros_like(alive).scatter(1, kept, heads)
    elif folding.combine == "add_mean":
        fold = RowFold(kept, into, into != torch.arange(into.shape[1], device=into.device)[None], "add_mean")
        alive = alive & ~torch.zeros_like(alive).scatter(1, kept, fold.joined)
    else:
        raise PolicyError.at(f"merge {merge.method} in the LLM combines with add_mean only so far", merge.span)
    state.folds.append(fold)  # features added to these rows later fold alike (Qwen3-VL's DeepStack)
    return alive, fold.apply(hidden)
