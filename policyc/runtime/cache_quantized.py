"""A decode cache layer that stores tokens as real b-bit codes (`cache mixed_precision`, ZipVL v1).

The quantizer (our reading: ZipVL, arXiv:2410.08584, names none; ZipCache's and KIVI's are per group):
asymmetric round-to-nearest min-max, **per token**, over groups of `group_size(d)` consecutive channels,
the same for keys and values. For one token of one key/value head, x [d] is split into d / g groups
x_k [g]; each group stores
    scale  = (max x_k - min x_k) / (2^b - 1)      in the cache's dtype
    offset = min x_k                              in the cache's dtype
    code_i = clamp(round((x_i - offset) / scale), 0, 2^b - 1)    (0 where scale is 0)
with the stored (dtype-rounded) scale and offset upcast to float32, `round` half to even; it reads back as
    x̂_i = code_i * scale + offset                 (float32, then the cache's dtype).
Codes are packed little-end first into uint8, 8 / b per byte (code i of a byte sits at bits b*i..b*i+b-1).

Why per token for keys too (KIVI and ZipCache group keys per channel): ZipVL's precision is a per-token
decision, so each token must carry its own width and its own statistics; per-channel groups would span tokens
of both widths, and quantizing a new window would re-quantize older tokens. The newest tokens stay in full
precision until the operator quantizes them (a residual, as KIVI's), which is where per-channel key statistics
help most.

Layout of one layer, [B, Hkv, n, ...] per part: one `QuantizedStore` per bit width (widest first), then the
full-precision residual (`keys`, `values`, as a `DynamicLayer`'s). Attention sees, in that order, every
store dequantized and then the residual; the slot map (`positions`) follows the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policyc.runtime.cache_slots import SlotLayer

BITS = (2, 4, 8)  # the widths the packer supports: 8 / b codes per byte
GROUP = 32  # channels per scale and offset (KIVI's and ZipCache's group size)


def group_size(head_dim: int) -> int:
    """Channels per group: 32, or the whole head when its width is not a multiple of 32."""
    return GROUP if head_dim % GROUP == 0 else head_dim


@dataclass
class Quantized:
    """b-bit codes of [..., d] values: codes [..., d * b / 8] uint8, scale and offset [..., d / g]."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.offset


def quantize(x: torch.Tensor, bits: int) -> Quantized:
    """x [..., d] -> its b-bit codes, per group of `group_size(d)` channels (module docstring)."""
    d = x.shape[-1]
    groups = x.float().unflatten(-1, (d // group_size(d), group_size(d)))  # [..., d/g, g]
    low, high = groups.amin(-1), groups.amax(-1)
    scale, offset = ((high - low) / (2 ** bits - 1)).to(x.dtype), low.to(x.dtype)
    step, zero = scale.float()[..., None], offset.float()[..., None]
    codes = torch.where(step > 0, torch.round((groups - zero) / step), 0.0).clamp(0, 2 ** bits - 1)
    return Quantized(pack(codes.flatten(-2).to(torch.uint8), bits), scale, offset, bits)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """The values [..., d] the codes stand for, in `dtype`."""
    codes = unpack(q.codes, q.bits).float()
    d = codes.shape[-1]
    groups = codes.unflatten(-1, (q.scale.shape[-1], d // q.scale.shape[-1]))
    return (groups * q.scale.float()[..., None] + q.offset.float()[..., None]).flatten(-2).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., d] uint8 below 2^bits -> [..., d * bits / 8] uint8, 8 / bits codes per byte."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes.unflatten(-1, (-1, per)) << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: [..., n] uint8 -> [..., n * 8 / bits] uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2)


def _gather(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t [B, Hkv, n, ...] at slots order [B, Hkv, m] -> [B, Hkv, m, ...]."""
    index = order.view(*order.shape, *([1] * (t.dim() - 3))).expand(*order.shape, *t.shape[3:])
    return torch.gather(t, 2, index)


def compaction(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, Hkv, n] bool -> (order [B, Hkv, m], empty [B, Hkv, m]): the kept slots first, in order, m the
    most any row keeps; `empty` marks the slots past a row's count."""
    count = keep.sum(-1)
    width = int(count.max()) if keep.numel() else 0
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return order, torch.arange(width, device=keep.device) >= count[..., None]


@dataclass
class QuantizedStore:
    """The slots held at one bit width: keys and values as codes, positions [B, Hkv, m] (-1: empty)."""

    keys: Quantized
    values: Quantized
    positions: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.keys.tensors(), *self.values.tensors())

    @staticmethod
    def joined(stores: list[QuantizedStore]) -> QuantizedStore:
        """The stores' slots in order, their empty slots removed (rows padded with empty slots at the end)."""
        positions = torch.cat([s.positions for s in stores], dim=-1)
        order, empty = compaction(positions >= 0)

        def join(parts: list[Quantized]) -> Quantized:
            tensors = [_gather(torch.cat(ts, dim=2), order) for ts in zip(*(q.tensors() for q in parts), strict=True)]
            return Quantized(*tensors, bits=parts[0].bits)

        return QuantizedStore(join([s.keys for s in stores]), join([s.values for s in stores]),
                              torch.gather(positions, -1, order).masked_fill(empty, -1))


class MixedPrecisionLayer(SlotLayer):
    """A `SlotLayer` whose older slots are b-bit codes: `stores` by width, then the full-precision residual
    (`keys`, `values` [B, Hkv, r, d]); `positions` [B, Hkv, n] covers the stores, widest first, then the
    residual. Attention reads every store dequantized (`update`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stores: dict[int, QuantizedStore] = {}

    def _stored(self) -> list[QuantizedStore]:
        return [self.stores[bits] for bits in sorted(self.stores, reverse=True)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states)
        stored = self._stored()
        if not stored:
            return keys, values
        return (torch.cat([*(dequantize(s.keys, keys.dtype) for s in stored), keys], dim=2),
                torch.cat([*(dequantize(s.values, values.dtype) for s in stored), values], dim=2))

    def quantize(self, widths: torch.Tensor, real: torch.Tensor) -> None:
        """Quantize residual slots: widths, real [B, Hkv, n] over every slot (only the residual's are read); a
        residual slot of width b > 0 moves to the b-bit store, one of width 0 stays, one not real is dropped
        (padding and empty slots are never attended)."""
        start = self.positions.shape[-1] - self.keys.shape[2]  # the residual's first slot
        widths, real, positions = widths[..., start:], real[..., start:], self.positions[..., start:]
        for bits in sorted({int(b) for b in widths[real].unique().tolist()} - {0}):
            chosen = (widths == bits) & real
            new = QuantizedStore(quantize(self.keys, bits), quantize(self.values, bits),
                                 positions.masked_fill(~chosen, -1))
            self.stores[bits] = QuantizedStore.joined([self.stores[bits], new] if bits in self.stores else [new])
        order, empty = compaction((widths == 0) & real)
        self.keys, self.values = _gather(self.keys, order), _gather(self.values, order)
        kept = torch.gather(positions, -1, order).masked_fill(empty, -1)
        self.positions = torch.cat([*(s.positions for s in self._stored()), kept], dim=-1)
        self.scores, self.newest, self.identity = None, None, False

    def kv_tensors(self) -> list[torch.Tensor]:
        """Every tensor holding keys or values: codes, scales and offsets of each store, and the residual
        (what `policyc bench` counts as KV cache bytes)."""
        return [t for s in self._stored() for t in s.tensors()] + [self.keys, self.values]
