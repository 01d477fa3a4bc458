"""The cache layer of decode-time cache policies under static caches: a fixed number of slots, written in place.

With `generate(cache_implementation="static")` on CUDA, transformers compiles each decode step (CUDA graphs), so
shapes must stay fixed and no step may wait on the device. After prefill (eager, policyc/runtime/cache.py), a layer's
evicted prompt is copied into a `StaticSlotLayer` of `capacity` slots: enough for every token it can hold at once
(the kept prompt plus every token generate() may still add, or the operator's bound, `CacheOp.most_held`, plus the
incoming token), rounded up to a multiple of `CAPACITY_BUCKET` (so nearby prompts share one compiled graph). Each
decode step writes its token into the first empty slot; evictions during decoding empty slots (slot map -1) instead
of moving keys, so slots are in no particular order (the operators see them in token order, cache.py). transformers'
own full-size `StaticLayer` (`original`) releases its keys and values once the prompt is copied (a prefill that
reuses the cache allocates them again): decoding holds and reads `capacity` slots per layer, not `max_cache_len`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from policyc.runtime.cache_slots import SlotLayer

CAPACITY_BUCKET = 64


def static_capacity(needed: int, max_cache_len: int) -> int:
    """`needed` slots rounded up to a bucket, at most `max_cache_len` (transformers sized it for the whole sequence)
    unless more are needed."""
    return max(needed, min(-(-needed // CAPACITY_BUCKET) * CAPACITY_BUCKET, max_cache_len))


class StaticSlotLayer(CacheLayerMixin):
    """`capacity` slots per key/value head, allocated once and updated in place (static addresses for CUDA graphs).

    keys, values: [B, Hkv, C, d]; positions: [B, Hkv, C] long, the token each slot holds (-1: empty); scores:
    [B, Hkv, C] float or None; seen: 0-dim long, the sequence's tokens. A decode step writes into `free()`.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, original: CacheLayerMixin, compact: SlotLayer, capacity: int) -> None:
        super().__init__()
        device, (batch, heads, _, dim) = compact.keys.device, compact.keys.shape
        self.keys = compact.keys.new_zeros(batch, heads, capacity, dim)
        self.values = compact.values.new_zeros(batch, heads, capacity, compact.values.shape[-1])
        self.positions = torch.full((batch, heads, capacity), -1, dtype=torch.long, device=device)
        self.scores = None if compact.scores is None else torch.zeros((batch, heads, capacity), device=device,
                                                                          dtype=compact.scores.dtype)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.prompt_size = torch.zeros(batch, dtype=torch.long, device=device)
        self.newest: torch.Tensor | None = None  # [B, H, C] the newest decode query's logits (scores "newest")
        for tensor in (self.keys, self.values, self.positions, self.seen, self.prompt_size,
                       *(() if self.scores is None else (self.scores,))):
            torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True
        self.load(original, compact)

    def fits(self, compact: SlotLayer, capacity: int) -> bool:
        """Whether `compact` can be loaded into these buffers (same batch, heads, dtype, capacity and scores)."""
        return (self.keys.shape[:2] == compact.keys.shape[:2] and self.keys.shape[2] == capacity
                and self.keys.dtype == compact.keys.dtype and self.keys.device == compact.keys.device
                and (self.scores is None) == (compact.scores is None))

    def load(self, original: CacheLayerMixin, compact: SlotLayer) -> None:
        """Copy an evicted prompt (a compacted `SlotLayer` of n <= capacity slots) into slots [0, n), in place, then
        release the full-size layer's storage (the prompt may still be a view of it until copied)."""
        count = compact.keys.shape[2]
        self.original = original
        self.keys.zero_(), self.values.zero_(), self.positions.fill_(-1)
        self.keys[:, :, :count].copy_(compact.keys)
        self.values[:, :, :count].copy_(compact.values)
        self.positions[:, :, :count].copy_(compact.positions)
        if self.scores is not None and compact.scores is not None:
            self.scores.zero_()
            self.scores[:, :, :count].copy_(compact.scores)
        self.seen.fill_(compact.seen)
        self.prompt_size.copy_(compact.prompt_size)
        self.max_cache_len = int(original.get_max_length())
        original.keys = original.values = None  # the next prefill into this cache allocates them again (lazily)
        original.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never called: the buffers are allocated in `__init__`."""

    def free(self) -> torch.Tensor:
        """[B, Hkv, 1] long: the first empty slot of each key/value head, where the incoming token goes. The capacity
        leaves one for every step (eagerly, running out is an error; compiled, the check is skipped)."""
        empty = self.positions < 0
        if not torch.compiler.is_compiling():
            torch._assert_async(empty.any(-1).all(), "policyc: a static cache slot layer ran out of empty slots")
        return empty.to(torch.int8).argmax(-1, keepdim=True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one decode step's keys and values [B, Hkv, 1, d] into each head's first empty slot; returns every
        slot."""
        at = self.free()
        self.keys.scatter_(2, at[..., None].expand_as(key_states), key_states)
        self.values.scatter_(2, at[..., None].expand_as(value_states), value_states)
        self.positions.scatter_(2, at, self.seen.expand_as(at))
        self.seen.add_(1)
        return self.keys, self.values

    def columns(self) -> torch.Tensor:
        """[B, Hkv, C] the tokens a decode step's query sees: the slot map with the incoming token in `free()`."""
        slot = torch.arange(self.positions.shape[-1], device=self.positions.device)
        return torch.where(slot == self.free(), self.seen, self.positions)

    def evict(self, keep: torch.Tensor) -> None:
        """Empty the slots `keep` ([B, Hkv, C] bool) leaves out, in place (their keys stay, masked)."""
        self.positions.masked_fill_(~keep, -1)
        if self.scores is not None:
            self.scores.masked_fill_(~keep, 0)

    def reset(self) -> None:
        self.positions.fill_(-1)
        self.seen.zero_()

    def get_seq_length(self) -> torch.Tensor:  # type: ignore[override]
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0  # generate()'s masks keep the original static width; decode_mask gathers them

    def get_max_length(self) -> int:
        return self.max_cache_len

    def _unsupported(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("policyc's decode cache policies support greedy search and sampling; beam search, "
                                  "assisted decoding and cache cropping would desynchronise the slot map")

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _unsupported
