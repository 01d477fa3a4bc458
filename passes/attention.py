"""`attention(QUERIES -> KEYS, heads=..., queries=...)`: the attention the key tokens receive from a
query set at this layer (FastV arXiv:2403.06764 reads the last row; its paper averages all rows).

Computed from the post-RoPE queries and keys the recording SDPA function saw: only the query rows
the policy names are scored, `softmax(q_rows · Kᵀ · scale)` over every key each row can see
(causal and padding), then reduced over heads and over rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores, selected_first

from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator

def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: torch.Tensor,
                   visible: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of selected query rows over all keys, per head.

    query: [B, H, L, d] and key: [B, Hkv, L, d] (post-RoPE); rows: [B, R] row indices;
    visible: [B, R, L] bool, which keys each row may see (causal and padding).
    Returns [B, H, R, L] in float32; rows that see no key are all zero.
    """
    batch, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1).float()  # [B, H, L, d], GQA groups share keys
    picked = torch.gather(query.float(), 2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], dim))
    logits = picked @ keys.transpose(-1, -2) * scaling  # [B, H, R, L]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probabilities, nan=0.0)


_HEADS = {"mean": lambda x: x.mean(1), "sum": lambda x: x.sum(1), "max": lambda x: x.amax(1)}


@register_signal
class Attention(SignalOp):
    name = "attention"
    options = frozenset({"heads", "queries", "layer"})

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        flow = call.args[0] if call.args else None
        if not isinstance(flow, ir.Flow):
            raise PolicyError.at("attention() needs a flow like `last -> vision`", call.span)
        layer = self.option(call, "layer", ctx)
        if layer is not None and not (isinstance(layer, ir.Name) and layer.id in ("next", "here")):
            raise PolicyError.at("attention(layer=...) takes `next` in the runtime so far", call.span)
        recorded = ctx.recorded_next("attention()") if isinstance(layer, ir.Name) and layer.id == "next" \
            else ctx.recorded("attention()")
        state = ctx.state
        current = state.kept  # [B, L'] original positions of the current rows
        is_query = torch.gather(ctx.set(flow.source), 1, current)  # [B, L']
        count = is_query.sum(1)
        width = int(count.max().item()) if count.numel() else 0
        rows = selected_first(is_query)[:, :width]  # query rows first
        real_row = torch.arange(width, device=count.device)[None] < count[:, None]  # [B, R]
        key_valid = torch.gather(state.valid, 1, current)
        live = state.live()  # fillers of a batch whose samples keep different counts are no keys
        key_valid = key_valid if live is None else key_valid & live
        visible = key_valid[:, None, :] & real_row[:, :, None]
        if ctx.causal:  # the LLM; the vision encoder attends both ways
            columns = torch.arange(current.shape[1], device=current.device)
            visible = visible & (columns[None, None, :] <= rows[:, :, None])
        probabilities = attention_rows(recorded.query, recorded.key, recorded.scaling, rows, visible)
        heads = self.option(call, "heads", ctx)
        per_row = _HEADS[heads.id if isinstance(heads, ir.Name) else "mean"](probabilities)  # [B, R, L']
        per_row = per_row.masked_fill(~real_row[:, :, None], float("nan"))
        queries = self.option(call, "queries", ctx)
        reduce = queries.id if isinstance(queries, ir.Name) else "mean"
        if reduce == "max":
            per_key = per_row.nan_to_num(float("-inf")).amax(1)
        else:
            per_key = (torch.nansum if reduce == "sum" else torch.nanmean)(per_row, 1)
        return scatter_scores(per_key, ctx)
