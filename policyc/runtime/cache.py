"""Decode-time cache policies (`stage decode { cache METHOD(...) }`) on transformers' cache classes.

- After prefill, each layer's `DynamicLayer` becomes a `SlotLayer` (policyc/runtime/cache_slots.py): the
  same keys and values plus a slot map, [B, Hkv, n], the token each slot holds (its index in the full
  sequence; -1: empty). It generalises `Runtime.kept_at_layer` to per-head, evolving caches. It reports
  the full sequence length, so `generate()` keeps building full-length masks and positions.
- Before a layer runs a decode step, its mask is the full mask's columns gathered through the slot
  map, per head ([B, H, 1, n]: SDPA takes per-head masks). A layer whose slots are still the whole
  sequence in order is left untouched (bit-exact with the unmodified model).
- The operator (passes/cache_*.py) decides which slots stay, after prefill and, for `every_step`
  operators, after each decode step. Attention scores come from a registered attention function
  that hands post-RoPE queries and keys to an observer (never eager attention or output_attentions).
- A quantizing operator (`QuantizingCacheOp`: `mixed_precision`) keeps every slot and names, after prefill
  and each decode step, the full-precision slots to store in b bits; its layers are `MixedPrecisionLayer`s
  (policyc/runtime/cache_quantized.py), whose slot map lists the b-bit stores, then the full-precision ones.
- Static caches (`cache_implementation="static"`, transformers' compiled CUDA-graph decode): right after prefill,
  each layer's evicted prompt moves into a fixed-capacity `StaticSlotLayer` (policyc/runtime/cache_static.py), where
  decode steps write in place and evictions empty slots; no decode step waits on the device for them. Operators
  that re-rotate keys (relative positions) or quantize them are refused there with a clear error.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.masking_utils import sdpa_mask

from policyc.compiler.plan import Plan
from policyc.errors import PolicyError
from policyc.kernels import column_sums
from policyc.lang import ir
from policyc.models.structure import linear_layers
from policyc.passes.cache_base import CACHE_OPS, CacheOp, QuantizingCacheOp, Slots
from policyc.runtime import attention
from policyc.runtime.cache_quantized import MixedPrecisionLayer
from policyc.runtime.cache_slots import SlotLayer
from policyc.runtime.cache_static import StaticSlotLayer, static_capacity

if TYPE_CHECKING:
    from policyc.runtime.llm import Runtime

OBSERVING_NAME = "policyc_sdpa_cache"


def _observing_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """The recording SDPA (policyc/runtime/attention.py), then the module's cache observer, if any."""
    output = attention._recording_sdpa(module, query, key, value, attention_mask, **kwargs)
    observer = getattr(module, "_policyc_cache_observer", None)
    if observer is not None:
        scaling = kwargs.get("scaling")
        observer(query, key, attention_mask, float(scaling) if scaling is not None else query.shape[-1] ** -0.5)
    return output


def register_observing() -> str:
    """Register the observing attention (and its mask function) with transformers; returns its name."""
    AttentionInterface.register(OBSERVING_NAME, _observing_sdpa)
    AttentionMaskInterface.register(OBSERVING_NAME, sdpa_mask)
    return OBSERVING_NAME


def _cache_of(kwargs: dict[str, object]) -> object:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _visible(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0


def newest_logits(query: torch.Tensor, key: torch.Tensor, scaling: float, visible: torch.Tensor) -> torch.Tensor:
    """A decode query's attention logits per query head: query [B, H, 1, d], key [B, Hkv, n, d] (post-RoPE),
    visible [B, 1 or H, 1, n] bool -> [B, H, n] float32, -inf where blocked (GQA: query heads share keys)."""
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1).float()
    logits = (query.float() @ keys.transpose(-1, -2) * scaling)[:, :, 0]
    return logits.masked_fill(~visible[:, :, 0], float("-inf"))


class CacheRuntime:
    """The decode-time cache policy of one compiled model: observers, slot layers, masks, evictions."""

    def __init__(self, plan: Plan, runtime: Runtime, op: CacheOp, span_sources: dict[str, str]) -> None:
        self.plan, self.runtime, self.op, self.sources = plan, runtime, op, span_sources
        count = len(plan.adapter.decoder_layers)
        stage_layers = sorted({k for s in plan.stages if s.kind == "llm" for k in s.layers})
        linear = set(linear_layers(plan.adapter.layer_types))  # a hybrid LLM's linear layers keep no KV (Qwen3.5)
        self.layers = [k for k in (range(count) if op.all_layers else range(stage_layers[0], count)) if k not in linear]
        self.prefill_scores: dict[int, torch.Tensor] = {}
        self._cache: object = None
        self._static_layers: dict[int, StaticSlotLayer] = {}  # reused by the next request: fixed CUDA-graph addresses

    @classmethod
    def build(cls, plan: Plan, runtime: Runtime) -> CacheRuntime | None:
        """The plan's cache policy, or None when decoding needs nothing (`cache full`, no decode stage,
        or `regather` without prefill stages)."""
        statements = [st for s in plan.stages if s.kind == "decode" for st in s.statements if isinstance(st, ir.Cache)]
        stage = next((s for s in plan.stages if s.kind == "decode"), None)
        if not statements or statements[-1].method == "full" or stage is None:
            return None
        try:
            op = CACHE_OPS[statements[-1].method](statements[-1], stage.values)
        except PolicyError as error:
            raise error.with_sources(dict(plan.checked.sources)) from None
        if not op.all_layers and not any(s.kind == "llm" for s in plan.stages):
            return None
        return cls(plan, runtime, op, dict(plan.checked.sources))

    # ------------------------------------------------------------ installation
    def install(self) -> str | None:
        """Attach observers where the operator reads attention; returns the attention function to use
        (None: the operator needs no scores)."""
        if self.op.scores == "none":
            return None
        if self.op.scores == "coactivation":  # MLP hooks, not attention (policyc/runtime/cache_coactivation.py)
            from policyc.runtime.cache_coactivation import install_coactivation

            self._mlp_hooks = install_coactivation(self)
            return None
        for k in self.layers:
            self.plan.adapter.decoder_attention[k]._policyc_cache_observer = self._observer(k)
        return register_observing()

    def remove(self) -> None:
        for handle in getattr(self, "_mlp_hooks", ()):
            handle.remove()
        for k in self.layers:
            attention_module = self.plan.adapter.decoder_attention[k]
            if hasattr(attention_module, "_policyc_cache_observer"):
                del attention_module._policyc_cache_observer

    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model pre-hook: a prefill starts afresh (a static cache gets its full-size layers back, for the prefill to
        fill); static caches an operator cannot run on are refused before any work."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and input_ids.shape[1] > 1:
            self.prefill_scores.clear()
            cache = _cache_of(kwargs)
            if isinstance(cache, StaticCache):
                error = self.static_cache_error()
                if error is not None:
                    raise error
                for index, layer in enumerate(cache.layers):  # a cache reused after reset(): full-size layers again
                    if isinstance(layer, StaticSlotLayer):
                        cache.layers[index] = layer.original
                        layer.original.reset()

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        """Model hook: after a prefill into a static cache, every handled layer evicts and moves into its
        fixed-capacity `StaticSlotLayer` (eagerly, before any compiled decode step)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        if not isinstance(input_ids, torch.Tensor) or input_ids.shape[1] <= 1 or not isinstance(cache, StaticCache):
            return
        state = self.runtime.state
        assert state is not None
        self._cache = cache
        for index in self.layers:
            original = cache.layers[index]
            compact = self._slot_layer(index)
            needed = compact.keys.shape[2] + original.get_max_length() - state.length  # every token still to come
            bound = self.op.most_held(self._slots(compact, after_prefill=False)) if self.op.every_step else None
            if bound is not None:  # and never fewer than the prompt held plus the first new token
                needed = max(min(needed, int(bound.max()) + 1), compact.keys.shape[2] + 1)
            capacity = static_capacity(needed, original.get_max_length())
            static = self._static_layers.get(index)
            if static is not None and static.fits(compact, capacity):
                static.load(original, compact)
            else:
                static = self._static_layers[index] = StaticSlotLayer(original, compact, capacity)
            cache.layers[index] = static

    def static_cache_error(self) -> PolicyError | None:
        """Why this operator cannot run on a static cache (None: it can)."""
        if isinstance(self.op, QuantizingCacheOp):
            reason = "stores older keys and values in fewer bits, in storage that grows"
        elif self.op.relative_positions:
            reason = "re-rotates the kept keys to their cache index after each eviction"
        else:
            return None
        return self.error(f"cache {self.op.name} needs a dynamic KV cache: it {reason}; static caches are not "
                          "supported", "drop cache_implementation=\"static\" from generate()")

    def error(self, message: str, hint: str | None = None) -> PolicyError:
        return PolicyError.at(message, self.op.statement.span, hint).with_sources(self.sources)

    # ------------------------------------------------------------ attention scores
    def _observer(self, index: int):  # type: ignore[no-untyped-def]
        def observe(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> None:
            if query.shape[2] > 1:
                if self.op.scores != "newest":
                    self.prefill_scores[index] = self._prefill_scores(index, query, key, scaling, mask)
                return
            layer = getattr(self._cache, "layers", [None] * (index + 1))[index]
            if not isinstance(layer, (SlotLayer, StaticSlotLayer)):
                return
            visible = _visible(mask) if mask is not None else torch.ones_like(
                layer.positions[:, :1, None, :], dtype=torch.bool)
            if self.op.scores in ("newest", "normalized"):
                layer.newest = newest_logits(query, key, scaling, visible[..., : key.shape[2]])
            if layer.scores is not None and self.op.scores == "accumulated":
                if isinstance(layer, StaticSlotLayer):  # in place: a fixed address under CUDA graphs
                    layer.scores.add_(column_sums(query, key, scaling, visible))
                else:
                    layer.scores = layer.scores + column_sums(query, key, scaling, visible)
        return observe

    def _prefill_scores(self, index: int, query: torch.Tensor, key: torch.Tensor, scaling: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Column sums over every real prompt row (accumulated), the same divided by the number of real rows that
        see each key (normalized: ZipVL's Eq. 7), or over the last `window` rows (window); each row sees the keys the
        layer's own `mask` [B, 1, L', W] lets it see (None: causal)."""
        state = self.runtime.state
        assert state is not None
        kept = self.runtime.kept_at_layer[index]
        rows = self.runtime.real_rows(index)  # [B, L'] real rows
        length = kept.shape[1]
        first_row = max(0, length - int(self.op.number("window"))) if self.op.scores == "window" else 0
        query_rows = torch.arange(first_row, length, device=kept.device)
        if mask is not None:  # the layer's own mask (Gemma 3: image blocks both ways, sliding windows)
            allowed = _visible(mask)[:, :1, first_row:length, :length]
        else:
            allowed = (torch.arange(length, device=kept.device)[None, :] <= query_rows[:, None])[None, None]
        visible = allowed & rows[:, None, None, :] & rows[:, None, first_row:, None]
        columns = column_sums(query[:, :, first_row:], key[:, :, :length], scaling, visible)
        if self.op.scores == "normalized":
            columns = columns / visible[:, :1].sum(2).clamp(min=1)  # [B, 1, L']: the rows that see each key
        return columns

    # ------------------------------------------------------------ decoding
    def handles(self, index: int) -> bool:
        return index in self.layers

    def decode_mask(self, index: int, kwargs: dict[str, object]) -> dict[str, object]:
        """Before decode step of layer `index`: its cache becomes a `SlotLayer` (the first time), and its
        mask the full mask's columns gathered through the slot map, per head."""
        self._cache = _cache_of(kwargs)
        layer = self._slot_layer(index)
        batch, heads = layer.positions.shape[:2]
        if isinstance(layer, StaticSlotLayer):
            columns = layer.columns()  # [B, Hkv, C]: the incoming token is written into slot `cursor`
        elif layer.identity:
            return kwargs
        else:
            current = torch.full((batch, heads, 1), layer.seen, device=layer.positions.device)
            columns = torch.cat([layer.positions, current], dim=-1)  # [B, Hkv, n + 1]
        exists = columns >= 0
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            if not isinstance(layer, StaticSlotLayer) and bool(exists.all()):
                return kwargs
            remapped = exists[:, :, None, :]
        else:
            full = mask.expand(batch, heads, mask.shape[2], mask.shape[3])
            index_ = columns.clamp(min=0)[:, :, None, :].expand(-1, -1, mask.shape[2], -1)
            remapped = torch.gather(full, 3, index_)
            blocked = torch.zeros((), dtype=mask.dtype) if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            remapped = remapped.masked_fill(~exists[:, :, None, :], blocked)
        groups = self.plan.adapter.decoder_attention[index].num_key_value_groups
        return {**kwargs, "attention_mask": remapped.repeat_interleave(groups, dim=1)}

    def decode_positions(self, index: int, hidden: torch.Tensor, kwargs: dict[str, object]) -> dict[str, object]:
        """Relative positions (StreamingLLM's pos-shift): once a layer has evicted, the new token takes the
        next index in its cache."""
        if not self.op.relative_positions:
            return kwargs
        layer = self._slot_layer(index)
        if layer.next_position is not None:
            positions = layer.next_position[:, None]
            rotary = self.plan.adapter.rotary
            if rotary is None:
                raise self.error(f"cache {self.op.name} re-rotates keys and needs the LLM's rotary embedding")
            embeddings = rotary(hidden, position_ids=positions)
            kwargs = {**kwargs, "position_ids": positions, "position_embeddings": embeddings}
        position_ids = kwargs["position_ids"]
        assert isinstance(position_ids, torch.Tensor)
        layer.incoming = position_ids[..., -1].expand(layer.keys.shape[0])
        return kwargs

    def prompt_tokens(self, index: int) -> torch.Tensor:
        """[B] real prompt tokens layer `index`'s cache holds now (its first key/value head)."""
        state = self.runtime.state
        assert state is not None
        positions = self._slot_layer(index).positions[:, 0]  # [B, n]
        in_prompt = (positions >= 0) & (positions < state.length)
        return (torch.gather(state.valid, 1, positions.clamp(0, state.length - 1)) & in_prompt).sum(1)

    def after_decode(self, index: int) -> None:
        if not self.op.every_step:
            return
        layer = self._slot_layer(index)
        if isinstance(layer, StaticSlotLayer):  # no gather of keys, no host sync: evicted slots are emptied in place
            slots = self._slots(layer, after_prefill=False)
            order = torch.where(layer.positions < 0, layer.positions.new_tensor(torch.iinfo(torch.long).max),
                                layer.positions).argsort(-1)  # token order, empty slots last (as in a SlotLayer)
            ordered = slots.reordered(order)
            keep = self.op.keep(ordered) | ordered.protected
            layer.evict(torch.zeros_like(keep).scatter(-1, order, keep))
        else:
            self._evict(index, layer, after_prefill=False)

    def _slot_layer(self, index: int) -> SlotLayer | StaticSlotLayer:
        """Layer `index`'s slot layer; the first time (after prefill), its cache evicted into a `SlotLayer`."""
        cache = self._cache
        layer = cache.layers[index]  # type: ignore[attr-defined]
        if isinstance(layer, (SlotLayer, StaticSlotLayer)):
            return layer
        if type(layer) not in (DynamicLayer, StaticLayer):
            raise self.error(f"cache {self.op.name} needs a dynamic or static KV cache, not {type(layer).__name__}")
        state = self.runtime.state
        assert state is not None
        kept = self.runtime.kept_at_layer.get(index)
        if kept is None:
            kept = torch.arange(state.length, device=layer.keys.device).expand(layer.keys.shape[0], -1)
        keys, values = layer.keys, layer.values
        if isinstance(layer, StaticLayer):  # the prefill filled its first slots (after_forward moves them on)
            keys, values = keys[:, :, :kept.shape[1]], values[:, :, :kept.shape[1]]
        batch, heads = keys.shape[:2]
        live = self.runtime.live_at_layer.get(index)
        real = torch.gather(state.valid, 1, kept) if live is None else self.runtime.real_rows(index)
        slots = kept if live is None else kept.masked_fill(~live, -1)  # fillers are empty slots
        positions = slots[:, None, :].expand(batch, heads, -1).contiguous()
        rotary = None
        if self.op.relative_positions:
            real = real.long()
            if self.runtime.compact and kept.shape[1] < state.length:
                rotary = real.cumsum(1) - 1
            else:
                rotary = torch.gather(state.valid.long().cumsum(1) - 1, 1, kept)
            rotary = rotary.clamp(min=0)[:, None, :].expand(batch, heads, -1).contiguous()
        kind = MixedPrecisionLayer if isinstance(self.op, QuantizingCacheOp) else SlotLayer
        slot = kind(keys, values, positions, state.length, self.prefill_scores.pop(index, None), rotary)
        slot.prompt_size = real.sum(1)
        cache.layers[index] = slot  # type: ignore[attr-defined]
        self._evict(index, slot, after_prefill=True)
        return slot

    def _slots(self, layer: SlotLayer | StaticSlotLayer, after_prefill: bool) -> Slots:
        state = self.runtime.state
        assert state is not None
        positions, length = layer.positions, state.length
        in_prompt = (positions >= 0) & (positions < length)
        at = positions.clamp(0, length - 1)

        def lookup(mask: torch.Tensor) -> torch.Tensor:
            return torch.gather(mask[:, None, :].expand(-1, positions.shape[1], -1), 2, at) & in_prompt

        real = (positions >= length) | lookup(state.valid)
        return Slots(positions, real, lookup(state.protected), (positions >= length) | lookup(state.alive()),
                     layer.scores, layer.prompt_size, after_prefill, layer.seen - length, layer.newest)

    def _evict(self, index: int, layer: SlotLayer, after_prefill: bool) -> None:
        slots = self._slots(layer, after_prefill)
        if isinstance(self.op, QuantizingCacheOp) and isinstance(layer, MixedPrecisionLayer):
            widths = self.op.widths(slots)
            if after_prefill or bool((widths > 0).any()):
                layer.quantize(widths, slots.real)
            return
        keep = self.op.keep(slots) | slots.protected
        if bool(keep.all()):
            return
        layer.select(keep)
        if self.op.relative_positions:
            self._renumber(index, layer)

    def _renumber(self, index: int, layer: SlotLayer) -> None:
        """Re-rotate the kept keys to their index among the layer's real slots (StreamingLLM's pos-shift)."""
        rotary = self.plan.adapter.rotary
        if rotary is None or layer.rotary is None:
            raise self.error(f"cache {self.op.name} re-rotates keys and needs the LLM's rotary embedding")
        real = self._slots(layer, False).real
        target = (real.long().cumsum(-1) - 1).clamp(min=0)
        delta = (target - layer.rotary).masked_fill(~real, 0)
        batch, heads, slots, dim = layer.keys.shape
        cos, sin = rotary(layer.keys, position_ids=delta.reshape(batch, heads * slots))
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        cos, sin = (t.view(batch, heads, slots, dim) / scale for t in (cos, sin))
        rotate_half = sys.modules[type(self.plan.adapter.decoder_attention[index]).__module__].rotate_half
        layer.keys = layer.keys * cos + rotate_half(layer.keys) * sin
        layer.rotary = torch.where(real, target, layer.rotary)
        layer.next_position = real.sum(-1)[:, 0]
