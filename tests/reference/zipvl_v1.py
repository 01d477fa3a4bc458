"""ZipVL v1's mixed-precision KV cache as we read the paper (He et al., arXiv:2410.08584 v1; algorithms.md §12.4
step 6; no public code exists), deliberately plain: one sample at a time without its padding, the Llama decoder
run by hand with explicit softmax attention, Python loops for the scores, the mass rule, the quantizer and the
packing; shares no code with policyc.

Quantizer (asymmetric round-to-nearest min-max): each cached token of each key/value head, keys and values
alike, is split into groups of 32 consecutive channels (the whole head when its width is not a multiple of
32). A group x gets scale = (max x - min x) / (2^b - 1) and offset = min x, both rounded to the cache's dtype;
each value's code is round((x - offset) / scale) (half to even, computed in float32 from the rounded scale and
offset), clamped to [0, 2^b - 1], and 0 where scale is 0; it reads back as code * scale + offset (float32, then
the cache's dtype). Codes are packed into bytes, 8 / b per byte, code i of a byte at bits b*i..b*i+b-1.

Prefill: dense. Then each layer scores every prompt token by ZipVL's normalized attention (Eq. 7): the attention
probability each prompt row pays it (mean over heads), summed over the rows at or after it, divided by their
number; the important set T is the fewest tokens, best first (ties to the earlier token), whose scores reach
`mass` of the total (Eq. 6, at least one; all of them when mass >= 1 or every score is 0). T is stored at
`high` bits, the other prompt tokens at `low` bits.

Decode: greedy. A generated token's keys and values are cached in full precision. After generated token number s
(the first being the prefill's answer) has gone through a layer, if s is a multiple of `every`, the layer scores
its last `every` entries by that token's query (per query head softmax(q . k * scale) over those entries only,
mean over heads) and stores those holding `mass` of it at `high` bits, the others at `low` bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastv import prompt_embeddings
from reference.zipvl import _finish, _project, best_first, decode_greedily, mass_count


@dataclass
class Codes:
    """One vector [d] quantized: packed codes [d * bits / 8] uint8, scale and offset [groups]."""

    packed: Tensor
    scale: Tensor
    offset: Tensor
    bits: int


@dataclass
class Entry:
    """One cached token of one layer: what attention reads ([Hkv, d], dequantized once quantized), and per
    key/value head the codes of its keys and values (None while it is in full precision)."""

    token: int
    keys: Tensor
    values: Tensor
    key_codes: list[Codes] | None = None
    value_codes: list[Codes] | None = None

    @property
    def bits(self) -> int:
        return self.key_codes[0].bits if self.key_codes else 0


@dataclass
class Row:
    tokens: list[int]  # generated tokens
    logits: list[Tensor]  # [V] per step
    caches: list[list[Entry]]  # per layer, its entries in the order they were cached
    important: list[list[int]]  # per layer, the prompt tokens stored at `high` bits


def group_width(head_dim: int) -> int:
    return 32 if head_dim % 32 == 0 else head_dim


def quantize_vector(x: Tensor, bits: int) -> Codes:
    """x [d] in the cache's dtype -> its codes (module docstring), one group of channels at a time."""
    width = group_width(x.shape[0])
    top = 2 ** bits - 1
    codes: list[int] = []
    scales, offsets = [], []
    for start in range(0, x.shape[0], width):
        group = x[start:start + width].float()
        scale, offset = ((group.max() - group.min()) / top).to(x.dtype), group.min().to(x.dtype)
        scales.append(scale)
        offsets.append(offset)
        if float(scale) == 0:
            codes += [0] * width
        else:
            codes += [min(max(int(c), 0), top) for c in torch.round((group - offset.float()) / scale.float())]
    per = 8 // bits
    packed = []
    for start in range(0, len(codes), per):
        byte = 0
        for i in range(per):
            byte += codes[start + i] << (bits * i)
        packed.append(byte)
    return Codes(torch.tensor(packed, dtype=torch.uint8), torch.stack(scales), torch.stack(offsets), bits)


def dequantize_vector(codes: Codes, dtype: torch.dtype) -> Tensor:
    """The values [d] `codes` stand for, in `dtype`."""
    per = 8 // codes.bits
    values: list[int] = []
    for byte in codes.packed.tolist():
        for i in range(per):
            values.append((byte >> (codes.bits * i)) % (2 ** codes.bits))
    width = len(values) // codes.scale.shape[0]
    out = []
    for k in range(codes.scale.shape[0]):
        group = torch.tensor(values[k * width:(k + 1) * width], dtype=torch.float32)
        out.append(group * codes.scale[k].float() + codes.offset[k].float())
    return torch.cat(out).to(dtype)


def quantize_entry(entry: Entry, bits: int) -> None:
    """Store `entry` at `bits` bits: its codes per key/value head, and what attention reads from now on."""
    entry.key_codes = [quantize_vector(entry.keys[h], bits) for h in range(entry.keys.shape[0])]
    entry.value_codes = [quantize_vector(entry.values[h], bits) for h in range(entry.values.shape[0])]
    entry.keys = torch.stack([dequantize_vector(c, entry.keys.dtype) for c in entry.key_codes])
    entry.values = torch.stack([dequantize_vector(c, entry.values.dtype) for c in entry.value_codes])


def _normalized(probs: Tensor) -> list[float]:
    """ZipVL's Eq. 7 for every prompt token: probs [H, n, n] causal."""
    mean = probs.mean(0)
    n = mean.shape[0]
    return [sum(float(mean[i, j]) for i in range(j, n)) / (n - j) for j in range(n)]


def _attention(query: Tensor, entries: list[Entry], scaling: float) -> Tensor:
    """query [H, 1, d] over the entries: probabilities [H, 1, S] (explicit softmax)."""
    keys = torch.stack([e.keys for e in entries], dim=1)  # [Hkv, S, d]
    keys = keys.repeat_interleave(query.shape[0] // keys.shape[0], 0)
    return torch.softmax(query @ keys.transpose(1, 2) * scaling, dim=-1)


def _recompress(entries: list[Entry], query: Tensor, scaling: float, every: int, mass: float, high: int,
                low: int) -> None:
    window = entries[-every:]
    heads = query.shape[0]
    groups = heads // window[0].keys.shape[0]
    attention = [0.0] * every
    for h in range(heads):
        logits = [float(query[h, 0] @ e.keys[h // groups]) * scaling for e in window]
        top = max(logits)
        weights = [math.exp(value - top) for value in logits]
        for i, weight in enumerate(weights):
            attention[i] += weight / sum(weights) / heads
    important = set(best_first(attention)[:mass_count(attention, mass)])
    for i, entry in enumerate(window):
        quantize_entry(entry, high if i in important else low)


@torch.no_grad()
def mixed_precision_row(model: LlavaForConditionalGeneration, embeds: Tensor, *, mass: float, high: int, low: int,
                        every: int, max_new_tokens: int) -> Row:
    """One unpadded sample: embeds [L, D]."""
    lm = model.model.language_model
    length = embeds.shape[0]
    rows = list(range(length))
    x = embeds
    caches: list[list[Entry]] = []
    important: list[list[int]] = []
    for index in range(len(lm.layers)):
        q, k, v = _project(model, index, x, rows)
        groups = q.shape[0] // k.shape[0]
        logits = q @ k.repeat_interleave(groups, 0).transpose(1, 2) * lm.layers[index].self_attn.scaling
        causal = torch.tensor([[j <= i for j in rows] for i in rows])
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        x = _finish(model, index, x, probs, v)
        scores = _normalized(probs)
        chosen = sorted(best_first(scores)[:mass_count(scores, mass)])
        important.append(chosen)
        entries = [Entry(t, k[:, t], v[:, t]) for t in rows]
        for entry in entries:
            quantize_entry(entry, high if entry.token in chosen else low)
        caches.append(entries)
    result = Row([], [], caches, important)

    def decode_layer(index: int, x: Tensor, position: int, step: int) -> Tensor:
        entries = caches[index]
        scaling = lm.layers[index].self_attn.scaling
        q, k, v = _project(model, index, x, [position])
        entries.append(Entry(position, k[:, 0], v[:, 0]))
        probs = _attention(q, entries, scaling)
        x = _finish(model, index, x, probs, torch.stack([e.values for e in entries], dim=1))
        if (step + 1) % every == 0:
            _recompress(entries, q, scaling, every, mass, high, low)
        return x

    decode_greedily(model, x, length, max_new_tokens, result.tokens, result.logits, decode_layer)
    return result


def mixed_precision_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                             pixel_values: Tensor, **options: object) -> list[Row]:
    """Each row alone, its (left) padding removed; options as `mixed_precision_row`."""
    embeds, _ = prompt_embeddings(model, input_ids, pixel_values)
    rows = []
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        rows.append(mixed_precision_row(model, embeds[b, real], **options))  # type: ignore[arg-type]
    return rows


def kv_bytes(head_dim: int, kv_heads: int, element: int, counts: dict[int, int]) -> int:
    """Closed form of one layer's key and value bytes for one sample: `counts` maps a width (0: full precision)
    to the tokens stored at it. A b-bit token costs, per key/value head, d * b / 8 code bytes plus a scale and
    an offset per group for its keys and the same for its values; a full-precision one 2 * d elements."""
    groups = head_dim // group_width(head_dim)
    total = 0
    for bits, count in counts.items():
        per_head = 2 * head_dim * element if bits == 0 else 2 * (head_dim * bits // 8 + 2 * groups * element)
        total += count * kv_heads * per_head
    return total
