"""`rank(scale=1, bias=0)`: SparseVLM v1's adaptive budget (arXiv:2410.04417, as its code's
`attn_postprocess_rank`): P is the attention of the selection's query rows to its candidates, the matrix of
`by attention(QUERIES -> KEYS)` at the stage's layer (head-reduced as its `heads=` says, softmax over every visible
key), and r = rank(P) (`torch.linalg.matrix_rank`, in float32). N candidates keep all N when r == N, else
min(int(r * scale + bias), N - 1), at least 0. The candidates are ranked by the selection's score as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SIGNAL_OPS
from policyc.passes.schedules import ScheduleOp, register_schedule

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_schedule
class Rank(ScheduleOp):
    spec = Spec("rank", "schedule", "adaptive: scale * rank(attention of the flow's queries to the set) + bias "
                "(SparseVLM v1)",
                options=(Option("scale", ("number",), "multiplier", default="1", low=0),
                         Option("bias", ("number",), "offset", default="0")),
                returns="schedule", paper="SparseVLM arXiv:2410.04417", runs=frozenset({"llm"}))
    adaptive = True
    reads_by = "attention"

    def counts(self, call: ir.Call, select: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
               score: torch.Tensor | None) -> torch.Tensor:
        by = ctx.definition(select.by) if select.by is not None else None
        if not (isinstance(by, ir.Call) and by.fn == "attention"):  # refused at compile time (runtime/support.py)
            raise PolicyError.at("rank() reads the attention matrix of the selection's `by attention(QUERIES -> "
                                 "KEYS)`", call.span)
        per_row, real_row, current = SIGNAL_OPS["attention"].here(by, ctx)  # type: ignore[attr-defined]
        columns = torch.gather(candidates, 1, current)  # [B, L'] which current rows are candidates
        scale, bias = self.number(call, "scale", ctx), self.number(call, "bias", ctx)
        counts = []
        for b in range(candidates.shape[0]):
            matrix = per_row[b][real_row[b]][:, columns[b]].float()
            size = int(columns[b].sum())
            rank = int(torch.linalg.matrix_rank(matrix)) if matrix.numel() else 0
            counts.append(size if rank == size else max(0, min(int(rank * scale + bias), size - 1)))
        return torch.tensor(counts, dtype=torch.long, device=candidates.device)
