"""Attention probabilities of selected query rows over all keys (FastV arXiv:2403.06764 scores image tokens by the
attention the last row pays them; SparseVLM arXiv:2410.04417 by the text rows'), from post-RoPE queries and keys:
only the R chosen rows are scored, never the L x L matrix, and grouped-query heads share their key/value head's keys
without copying them per query head."""

from __future__ import annotations

import torch

from policyc.kernels.base import Kernel, register_kernel


@register_kernel
class AttentionRows(Kernel):
    name = "attention_rows"

    def compute(self, query: torch.Tensor, key: torch.Tensor, scaling: float, rows: torch.Tensor,
                visible: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """query: [B, H, L, d] and key: [B, Hkv, L, d] (post-RoPE; H a multiple of Hkv); rows: [B, R] row indices;
        visible: [B, R, L] bool, which keys each row may see (causal and padding); bias: [B, L], a logit added to
        each key (ToMe's proportional attention), or None. Returns [B, H, R, L] float32:
        softmax(q_row · Kᵀ · scaling + bias) over the visible keys; rows that see no key are all zero."""
        batch, heads, _, dim = query.shape
        kv_heads, length = key.shape[1], key.shape[2]
        groups = heads // kv_heads
        picked = torch.gather(query, 2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], dim)).float()
        # query head h reads key/value head h // groups: [B, Hkv, groups * R, d] against [B, Hkv, L, d]
        grouped = picked.reshape(batch, kv_heads, groups * rows.shape[1], dim)
        logits = (grouped @ key.float().transpose(-1, -2) * scaling).view(batch, heads, rows.shape[1], length)
        if bias is not None:
            logits = logits + bias.float()[:, None, None, :]
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
        probabilities = torch.softmax(logits, dim=-1)
        # rows that see no key are 0/0 = NaN: zero them; a NaN from the model itself stays (the guards catch it)
        return probabilities.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)
