"""An LLM merge as a linear map of the sequence's rows, kept for what must be folded the same way later.

`merge_rows` (llm.py) combines a layer's output rows with a `RowFold` and records it on the prefill state
(`PrefillState.folds`). Features the model adds to those rows after the merge (Qwen3-VL's DeepStack levels, added
after LLM layers 0..2: policyc/models/qwen3_vl.py) replay the prefill's folds on a table over prompt positions
(`at_positions`), so that a merged token receives the same combination of its members' features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RowFold:
    """Row j of the rows the merge saw (`kept`) folds into row `into[b, j]` (j itself when it stays).

    - `add_mean` (VisionDrop's `merge nearest`, arXiv:2506.22283): a receiver becomes itself plus the mean of the
      `joined` rows folded into it;
    - `mean` (SparseVLM's recycling, arXiv:2410.04417): a receiver becomes the mean of its group's `joined` rows
      (its own included).
    Rows that receive nothing stay as they are."""

    kept: torch.Tensor  # [B, L'] long: the prompt positions of the rows the merge saw
    into: torch.Tensor  # [B, L'] long: the row each row folds into
    joined: torch.Tensor  # [B, L'] bool: the rows that join their receiver's combination
    combine: Literal["add_mean", "mean"]

    def received(self) -> torch.Tensor:
        """[B, L'] bool: the rows some `joined` row folded into."""
        return torch.zeros_like(self.into).scatter_add(1, self.into, self.joined.long()) > 0

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """The merged rows: [B, L', C] over `kept` -> [B, L', C]."""
        joined = self.joined.to(rows.dtype)
        count = torch.zeros(self.into.shape, dtype=rows.dtype, device=rows.device).scatter_add(1, self.into, joined)
        total = torch.zeros_like(rows).scatter_add(1, self.into[:, :, None].expand_as(rows), rows * joined[:, :, None])
        mean = total / count.clamp(min=1)[:, :, None]
        merged = rows + mean if self.combine == "add_mean" else mean
        return torch.where((count > 0)[:, :, None], merged, rows)

    def at_positions(self, table: torch.Tensor) -> torch.Tensor:
        """The fold on a table over prompt positions [B, L, C]: the rows at `kept` merged, the rest unchanged."""
        wide = self.kept[:, :, None].expand(-1, -1, table.shape[-1])
        return table.scatter(1, wide, self.apply(table.gather(1, wide)))


def replay(table: torch.Tensor, folds: Iterable[RowFold]) -> torch.Tensor:
    """`table` [B, L, C] over prompt positions after every fold of `folds`, in order."""
    for fold in folds:
        table = fold.at_positions(table)
    return table


__all__ = ["RowFold", "replay"]
