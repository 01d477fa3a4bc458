"""Rows, masks and positions of a prompt whose tokens were dropped: gathering a layer's inputs to the rows
it keeps, remapping mask columns to the keys a shorter (dynamic or static) cache holds, and renumbering.

Shared by the eager layer wrappers (compiled.py) and the graph backends' operators (ops.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from policyc.errors import PolicyError

if TYPE_CHECKING:
    from policyc.runtime.evaluate import PrefillState


def valid_keys(attention_mask: torch.Tensor | Mapping[str, torch.Tensor | None], input_ids: torch.Tensor,
               ) -> torch.Tensor:
    """[B, L] bool: which prompt positions (of input_ids [B, L]) are real tokens. Accepts the 2D padding mask, or
    the 4D mask generate() builds for static caches (bool, or additive with 0 where attending), or its mapping per
    layer type (Qwen2-VL's: the full-attention one is read; None there means no padding)."""
    length = input_ids.shape[1]
    if isinstance(attention_mask, Mapping):
        if "full_attention" not in attention_mask:
            raise PolicyError.at(f"policyc cannot read padding from masks of layer types {sorted(attention_mask)} "
                                 "only (no full_attention mask)", None, "pass a 2D attention_mask to the model")
        full = attention_mask["full_attention"]
        if full is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = full
    if attention_mask.dim() == 2:
        return attention_mask[:, :length].bool()
    last_row = attention_mask[:, 0, -1, :length]  # the last prompt row sees every real key
    return last_row if last_row.dtype == torch.bool else last_row == 0


def compact_positions(valid: torch.Tensor, kept: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """Positions 0..n-1 over the kept real tokens ([B, L']), as HF numbers a left-padded prompt; fillers
    (rows where `live` is False) take no number."""
    real = torch.gather(valid, 1, kept)
    real = real if live is None else real & live
    return (real.long().cumsum(1) - 1).clamp(min=0)


def block_fillers(mask: torch.Tensor, live: torch.Tensor, prefill: bool) -> torch.Tensor:
    """Mask [B, 1 or H, q, W] with the key columns of fillers (rows where `live` [B, L'] is False) blocked; the
    columns past L' (generated tokens, a static cache's tail) stay as they are. In prefill each filler row still
    sees itself, so that no row is fully masked."""
    batch, rows = live.shape
    allowed = torch.ones(batch, mask.shape[-2], mask.shape[-1], dtype=torch.bool, device=live.device)
    allowed[:, :, :rows] = live[:, None, :]
    if prefill:
        allowed[:, :, :rows] |= torch.eye(rows, dtype=torch.bool, device=live.device)[None]
    allowed = allowed[:, None]
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def gather_rows(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather along `dim` (the sequence) with per-sample `index` [B, n]; broadcasts a batch of 1."""
    shape = list(tensor.shape)
    shape[0] = index.shape[0]
    tensor = tensor.expand(shape)
    view = [index.shape[0]] + [1] * (tensor.dim() - 1)
    view[dim] = index.shape[1]
    expanded = list(tensor.shape)
    expanded[dim] = index.shape[1]
    return torch.gather(tensor, dim, index.view(view).expand(expanded))


def key_columns(kept: torch.Tensor, length: int, width: int, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key slot of a layer that cached only the `kept` prompt rows: the column of the
    full-length mask (width `width`) that describes it (kept rows first, then generated tokens),
    and whether the slot exists in the full mask at all ([B, slots] each).

    A dynamic cache holds `width - dropped` keys; a static one always `width` slots, the tail of
    which has no column in the full mask and must stay masked.
    """
    dropped = length - kept.shape[1]
    slots = width if static else width - dropped
    # slot j >= K (the kept count) holds generated token j - K, at column length + j - K; built without expanding
    # the generated tokens' arange, which would specialize a compiled decode step to its first token (a size-1 dim)
    slot = torch.arange(slots, device=kept.device)[None, :]
    padded = torch.nn.functional.pad(kept, (0, slots - kept.shape[1]))
    columns = torch.where(slot < kept.shape[1], padded, slot - kept.shape[1] + length)
    return columns.clamp(max=width - 1), columns < width


def remap_columns(mask: torch.Tensor, kept: torch.Tensor, length: int, static: bool) -> torch.Tensor:
    columns, exists = key_columns(kept, length, mask.shape[-1], static)
    remapped = gather_rows(mask, columns, 3)
    blocked = torch.zeros((), dtype=mask.dtype) if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return remapped.masked_fill(~exists[:, None, None, :], blocked)


def is_static(kwargs: dict[str, object]) -> bool:
    from transformers import StaticCache

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return isinstance(cache, StaticCache)


def gather_prefill(kwargs: dict[str, object], state: PrefillState, live: torch.Tensor | None = None,
                   ) -> dict[str, object]:
    kept = state.kept
    out = dict(kwargs)
    cos, sin = kwargs["position_embeddings"]  # type: ignore[misc]
    out["position_embeddings"] = (gather_rows(cos, kept, 1), gather_rows(sin, kept, 1))
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor):
        out["position_ids"] = gather_rows(position_ids, kept, position_ids.dim() - 1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        out["attention_mask"] = remap_columns(gather_rows(mask, kept, 2), kept, state.length, is_static(kwargs))
    if live is not None:
        mask = out.get("attention_mask")
        if not isinstance(mask, torch.Tensor):  # SDPA's implicit causal mask over the kept rows, made explicit
            rows = kept.shape[1]
            mask = torch.zeros(kept.shape[0], 1, rows, _static_slots(kwargs) or rows, dtype=torch.bool,
                               device=kept.device)
            mask[:, 0, :, :rows] = kept[:, None, :] <= kept[:, :, None]
        out["attention_mask"] = block_fillers(mask, live, True)
    return out


def _static_slots(kwargs: dict[str, object]) -> int | None:
    """A static cache's slot count (its keys' length), or None for other caches. Read from its first layer that
    has slots: a hybrid LLM's linear-attention layers (Qwen3.5) hold a fixed-size state instead."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None) if is_static(kwargs) else None
    return next((n for layer in layers or () if isinstance(n := getattr(layer, "max_cache_len", None), int)), None)


def gather_decode(kwargs: dict[str, object], kept: torch.Tensor, length: int, live: torch.Tensor | None = None,
                  steps: int | torch.Tensor = 0) -> dict[str, object]:
    """A decode step's mask for a layer that cached the prefill rows `kept` [B, L'] (`live`: which were no
    fillers) and `steps` generated tokens since (a [] tensor under a static cache: compiled decode steps read it)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        mask = remap_columns(mask, kept, length, is_static(kwargs))
    elif live is None:
        return kwargs
    else:  # no mask: every cached key and the new token (a static cache's unfilled tail masked)
        filled = kept.shape[1] + steps + 1
        slots = torch.arange(_static_slots(kwargs) or int(filled), device=kept.device)
        mask = (slots < filled).expand(kept.shape[0], 1, 1, -1)
    if live is not None:
        mask = block_fillers(mask, live, False)
    return {**kwargs, "attention_mask": mask}
