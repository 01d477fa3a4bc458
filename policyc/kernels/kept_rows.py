"""The row indices a stage keeps, in their original order ([B, L] keep flags -> [B, n] indices): a cumulative sum
and one scatter instead of sorting. Where the samples of a batch keep different counts, a sample keeping fewer than
n carries its earliest dropped rows on as fillers (the runtime masks them as keys: policyc/runtime/llm.py)."""

from __future__ import annotations

import torch

from policyc.kernels.base import Kernel, register_kernel


@register_kernel
class KeptRows(Kernel):
    name = "kept_rows"

    def compute(self, keep: torch.Tensor, width: int) -> torch.Tensor:
        """keep [B, L] bool, width n >= every row's kept count -> [B, n] long, strictly increasing per row: the kept
        rows plus the first n - count dropped ones."""
        counts = keep.sum(1, keepdim=True)
        fillers = ~keep & ((~keep).long().cumsum(1) <= width - counts)
        included = keep | fillers  # exactly n per row
        slot = (included.long().cumsum(1) - 1).masked_fill(~included, width)  # excluded rows go to a spare column
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(slot)
        out = torch.zeros(keep.shape[0], width + 1, dtype=torch.long, device=keep.device)
        return out.scatter(1, slot, positions)[:, :width]
