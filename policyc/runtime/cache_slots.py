"""The cache layer of decode-time cache policies: a `DynamicLayer` with a slot map (policyc/runtime/cache.py)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class SlotLayer(DynamicLayer):
    """A `DynamicLayer` whose n slots per key/value head may hold any tokens of the sequence.

    keys, values: [B, Hkv, n, d]; positions: [B, Hkv, n] each slot's token (-1: empty); scores:
    [B, Hkv, n] what the operator ranks by (or None); rotary: [B, Hkv, n] the rotary position each key
    was rotated at (only for operators with relative positions). `seen` counts the sequence's tokens.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, seen: int,
                 scores: torch.Tensor | None, rotary: torch.Tensor | None) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.positions, self.seen, self.scores, self.rotary = positions, seen, scores, rotary
        self.identity = positions.shape[-1] == seen and bool((positions >= 0).all())  # the whole sequence, in order
        self.prompt_size = torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)
        self.next_position: torch.Tensor | None = None  # [B] once keys are renumbered (relative positions)
        self.incoming: torch.Tensor | None = None  # [B] rotary position of the token being added
        self.newest: torch.Tensor | None = None  # [B, H, n] the newest decode query's logits (scores "newest")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, count = key_states.shape[:3]
        new = torch.arange(self.seen, self.seen + count, device=self.positions.device).expand(batch, heads, count)
        self.positions = torch.cat([self.positions, new], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, heads, count)], dim=-1)
        if self.rotary is not None and self.incoming is not None:
            self.rotary = torch.cat([self.rotary, self.incoming[:, None, None].expand(batch, heads, count)], dim=-1)
        if self.next_position is not None:
            self.next_position = self.next_position + count
        self.seen += count
        return super().update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def _unsupported(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("policyc's decode cache policies support greedy search and sampling; beam search, "
                                  "assisted decoding and cache cropping would desynchronise the slot map")

    reorder_cache = batch_repeat_interleave = batch_select_indices = crop = _unsupported

    def select(self, keep: torch.Tensor) -> None:
        """Keep the `keep` slots ([B, Hkv, n] bool) of each head, in order; rows keeping fewer are padded
        with empty slots."""
        count = keep.sum(-1)
        width = int(count.max())
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        empty = torch.arange(width, device=keep.device) >= count[..., None]
        rows = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = torch.gather(self.keys, 2, rows), torch.gather(self.values, 2, rows)
        self.positions = torch.gather(self.positions, -1, order).masked_fill(empty, -1)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, -1, order)
        if self.rotary is not None:
            self.rotary = torch.gather(self.rotary, -1, order)
        self.newest = None  # its columns were the slots before this selection
        self.identity = False
