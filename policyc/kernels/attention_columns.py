"""The attention each key receives, summed over a block of query rows (H2O arXiv:2306.14048's accumulated
attention, ZipVL arXiv:2410.08584's normalized scores, SnapKV arXiv:2404.14469's observation window): callers walk
the prompt's rows in blocks (`column_sums`), so the L x L matrix never exists, and grouped-query heads share their
key/value head's keys without copying them."""

from __future__ import annotations

import torch

from policyc.kernels.base import KERNELS, Kernel, register_kernel

ROWS_PER_BLOCK = 256  # query rows scored at once: [B, H, 256, L] float32 at most


@register_kernel
class AttentionColumns(Kernel):
    name = "attention_columns"

    def compute(self, query: torch.Tensor, key: torch.Tensor, scaling: float, visible: torch.Tensor) -> torch.Tensor:
        """query [B, H, q, d], key [B, Hkv, n, d] (post-RoPE), visible [B, 1 or H, q, n] bool -> [B, Hkv, n] float32:
        each row's softmax over the keys it sees, summed over the q rows and over the query heads of each key/value
        head. Rows that see no key add nothing."""
        batch, heads, rows, dim = query.shape
        kv_heads, length = key.shape[1], key.shape[2]
        groups = heads // kv_heads
        grouped = query.float().reshape(batch, kv_heads, groups * rows, dim)
        logits = (grouped @ key.float().transpose(-1, -2) * scaling).view(batch, heads, rows, length)
        logits = logits.masked_fill(~visible, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        return probabilities.sum(2).view(batch, kv_heads, groups, length).sum(2)


def column_sums(query: torch.Tensor, key: torch.Tensor, scaling: float, visible: torch.Tensor) -> torch.Tensor:
    """`AttentionColumns` over every row of `query`, ROWS_PER_BLOCK rows at a time: [B, Hkv, n] float32."""
    total = key.new_zeros((key.shape[0], key.shape[1], key.shape[2]), dtype=torch.float32)
    for start in range(0, query.shape[2], ROWS_PER_BLOCK):
        block = slice(start, start + ROWS_PER_BLOCK)
        # contiguous blocks: a slice's strides depend on the whole prompt's length, and compiled code guards on them
        total = total + KERNELS["attention_columns"](query[:, :, block].contiguous(), key, scaling,
                                                     visible[:, :, block].contiguous())
    return total
