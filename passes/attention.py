"""`attention(QUERIES -> KEYS, heads=..., queries=...)`: the attention the key tokens receive from a
query set at this layer (FastV arXiv:2403.06764 reads the last row; its paper averages all rows).

Computed from the post-RoPE queries and keys the recording SDPA function saw: only the query rows
the policy names are scored, `softmax(q_rows · Kᵀ · scale)` over every key each row can see
(causal and padding, or the model's own mask where it is not causal: Gemma 3's bidirectional image blocks and
sliding windows), then reduced over heads and over rows. After a proportional merge (ToMe) in the LLaVA-style
encoder, the logits include the log(size) bias the layer added, so the scores are that layer's softmax.

In LLM stages `layer=previous` reads the layer before the stage's as it ran (its rows, its keys; CATP
arXiv:2508.07871 takes the gain A^K - A^(K-1) of the last token's attention).

In encoder stages `layer=k` reads an earlier encoder layer (at or before the stage's) and `layers=a..b`
sums the scores of several (VTC-CLS arXiv:2412.05819): each layer's attention is as that layer computed
it, over the rows it ran on, with the query set as it is at the stage. `space=values` scores with the
layer's attention values instead, softmax(v_q . v_k) unscaled (FlowCut's semantic score, arXiv:2505.19536).

`correct=causal` divides each key's summed attention by the number of query rows that can see it, instead of
by all the rows (`queries=mean`) or not at all (`queries=sum`): causal attention lets early keys collect mass
from more rows (ZipVL's normalized attention score, arXiv:2410.08584 Eq. 7; kvpress does the same).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, selected_first

from policyc.catalog.base import Option, Spec
from policyc.catalog.signals import LAYER
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import Captured, StageEvaluator

_HEADS = {"mean": lambda x: x.mean(1), "sum": lambda x: x.sum(1), "max": lambda x: x.amax(1)}


@register_signal
class Attention(SignalOp):
    spec = Spec(
        "attention", "signal",
        "attention the key tokens receive from a query set: softmax over all visible keys, then reduced",
        options=(
            Option("flow", ("flow",), "queries -> keys, e.g. last -> vision", positional=True),
            Option("heads", ("enum",), "reduce over heads", default="mean", choices=("mean", "sum", "max")),
            Option("queries", ("enum",), "reduce over query rows", default="mean", choices=("mean", "sum", "max")),
            LAYER,
            Option("layers", ("range",), "sum the scores of encoder layers a..b (inclusive; negative indices "
                   "count from the end), each at or before the stage's layer (VTC-CLS's ensemble)",
                   default="here", integer=True),
            Option("top_heads", ("count",), "keep only the k heads giving the keys most mass (SparseVLM v2)",
                   default="all", low=1, integer=True),
            Option("space", ("enum",), "`values`: softmax of unscaled value products (FlowCut's semantic score)",
                   default="keys", choices=("keys", "values")),
            Option("correct", ("enum",), "bias correction: `causal` divides by the queries that see each key; "
                   "`rope` divides by the RoPE distance bias (SparseVLM v2)", default="none",
                   choices=("none", "causal", "rope")),
            Option("softmax", ("enum",), "normalise over `all` visible keys or only the `keys` of the flow",
                   default="all", choices=("all", "keys")),
        ),
        paper="FastV arXiv:2403.06764; PyramidDrop arXiv:2410.17247; VTC-CLS arXiv:2412.05819",
        runs=frozenset({"encoder", "llm"}), unimplemented=frozenset({"top_heads", "softmax"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        flow = call.args[0] if call.args else None
        if not isinstance(flow, ir.Flow):
            raise PolicyError.at("attention() needs a flow like `last -> vision`", call.span)
        layer = self.option(call, "layer", ctx)
        if isinstance(layer, ir.Number) or self.option(call, "layers", ctx) is not None:
            earlier = getattr(ctx, "earlier_attention", None)  # encoder stages (policyc/runtime/vision_evaluate.py)
            if earlier is None:
                raise PolicyError.at("attention(layer=<index>) and layers=a..b read encoder layers", call.span)
            per_layer = [self.received(call, flow, ctx, *earlier(k)) for k in ctx.signal_layers(call)]
            return torch.stack(per_layer).sum(0)  # VTC-CLS's ensemble: the sum over the layers
        if isinstance(layer, ir.Name) and layer.id == "previous":  # CATP: the LLM layer before the stage's
            previous = getattr(ctx, "previous_layer", None)
            if previous is None:
                raise PolicyError.at("attention(layer=previous) reads an LLM layer", call.span)
            recorded, rows, keys = previous()
            return self.received(call, flow, ctx, recorded, rows, keys)
        if layer is not None and not (isinstance(layer, ir.Name) and layer.id in ("next", "here")):
            raise PolicyError.at("attention(layer=...) takes `next`, `previous` or an encoder layer in the runtime so "
                                 "far", call.span)
        space = self.option(call, "space", ctx)
        if isinstance(space, ir.Name) and space.id == "values":  # FlowCut: softmax of unscaled v_q . v_k
            values = getattr(ctx, "recorded_values", None)
            if values is None:
                raise PolicyError.at("attention(space=values) reads encoder values", call.span)
            from policyc.runtime.evaluate import Captured  # here: the runtime imports the passes

            recorded = Captured(values("attention(space=values)"), values("attention(space=values)"), 1.0)
        else:
            recorded = ctx.recorded_next("attention()") if isinstance(layer, ir.Name) and layer.id == "next" \
                else ctx.recorded("attention()")
        return self.received(call, flow, ctx, recorded, *current_keys(ctx))

    def received(self, call: ir.Call, flow: ir.Flow, ctx: StageEvaluator, recorded: Captured, origin: torch.Tensor,
                 key_valid: torch.Tensor) -> torch.Tensor:
        """The attention each key row of `recorded` receives, at the original positions: [B, L].
        origin: [B, R] the original position of each recorded row; key_valid: [B, R] which rows were keys."""
        per_row, real_row, visible = self.matrix(call, flow, ctx, recorded, origin, key_valid)
        count, width = real_row.sum(1), real_row.shape[1]
        queries = self.option(call, "queries", ctx)
        reduce = queries.id if isinstance(queries, ir.Name) else "mean"
        correct = self.option(call, "correct", ctx)
        causal = isinstance(correct, ir.Name) and correct.id == "causal"
        padding = ~real_row[:, :, None]  # masked explicitly (not nan-skipping reductions: a model NaN must show)
        if reduce == "max":
            per_key = per_row.masked_fill(padding, float("-inf")).amax(1) if width else per_row.sum(1)
        else:
            per_key = per_row.masked_fill(padding, 0.0).sum(1)
            if causal:  # ZipVL's normalized score: the mean over the rows that can see each key
                seen_by = visible.sum(1)  # [B, R]
                per_key = (per_key / seen_by.clamp(min=1).to(per_key.dtype)).masked_fill(seen_by == 0, 0.0)
            elif reduce == "mean":
                per_key = per_key / count.clamp(min=1)[:, None].to(per_key.dtype)
        per_key = per_key.masked_fill((count == 0)[:, None], 0.0)  # no query row (e.g. no text): no attention
        return torch.zeros(ctx.state.image.shape, dtype=per_key.dtype, device=per_key.device).scatter(1, origin,
                                                                                                       per_key)

    def matrix(self, call: ir.Call, flow: ir.Flow, ctx: StageEvaluator, recorded: Captured, origin: torch.Tensor,
               key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query rows' attention probabilities, reduced over heads: [B, Q, R] (query rows in position order,
        keys the recorded rows), which of the Q rows are real [B, Q] (samples differ in their query counts), and
        which keys each query row could see [B, Q, R]."""
        is_query = torch.gather(ctx.set(flow.source), 1, origin)  # [B, R]
        count = is_query.sum(1)
        width = int(count.max().item()) if count.numel() else 0
        rows = selected_first(is_query)[:, :width]  # query rows first
        real_row = torch.arange(width, device=count.device)[None] < count[:, None]  # [B, Q]
        visible = key_valid[:, None, :] & real_row[:, :, None]
        if recorded.visible is not None:  # the model's own mask (Gemma 3's image blocks and sliding windows)
            visible = visible & torch.gather(recorded.visible, 1, rows[:, :, None].expand(-1, -1, origin.shape[1]))
        elif ctx.causal:  # the LLM; the vision encoder attends both ways
            columns = torch.arange(origin.shape[1], device=origin.device)
            visible = visible & (columns[None, None, :] <= rows[:, :, None])
        probabilities = KERNELS["attention_rows"](recorded.query, recorded.key, recorded.scaling, rows, visible,
                                                  recorded.bias)
        heads = self.option(call, "heads", ctx)
        return _HEADS[heads.id if isinstance(heads, ir.Name) else "mean"](probabilities), real_row, visible

    def here(self, call: ir.Call, ctx: StageEvaluator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`matrix` at the stage's own layer over the current rows, with the rows' original positions [B, L']
        (SparseVLM v1's `rank()` schedule reads it)."""
        flow = call.args[0] if call.args else None
        given = [self.option(call, name, ctx) for name in ("layer", "layers", "space")]
        if not isinstance(flow, ir.Flow) or any(v is not None and not (isinstance(v, ir.Name) and v.id in (
                "here", "keys")) for v in given):
            raise PolicyError.at("this reads the attention matrix of the stage's own layer: attention(QUERIES -> "
                                 "KEYS) without layer=, layers= or space=values", call.span)
        current, key_valid = current_keys(ctx)
        per_row, real_row, _ = self.matrix(call, flow, ctx, ctx.recorded("attention()"), current, key_valid)
        return per_row, real_row, current


def current_keys(ctx: StageEvaluator) -> tuple[torch.Tensor, torch.Tensor]:
    """The current rows' original positions [B, L'] and which of them are keys [B, L'] (not padding, and not the
    fillers of a batch whose samples keep different counts)."""
    current = ctx.state.kept
    key_valid = torch.gather(ctx.state.valid, 1, current)
    live = ctx.state.live()
    return current, key_valid if live is None else key_valid & live
