"""`attention_share(QUERIES -> KEYS)`: the share of the query rows' attention that lands on the key set, one
number per sample (ToDRE arXiv:2505.18757 v2, Eq. 8: a_t->v = `attention_share(text -> vision)`,
a_v->t = `attention_share(vision -> text)`).

With A the layer's post-softmax attention averaged over heads ([L', L'], each query row over the keys it sees):
share = Σ_{i∈Q} Σ_{j∈K} A_ij / Σ_{i∈Q} Σ_j A_ij, the denominator being |Q| (every row sums to 1). 0 for a sample
with no query row. Broadcast over the sample's tokens ([B, L]), like `sum(x)`, so `vision where
attention_share(text -> vision) < tau` holds for every image token of a sample or for none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.attention import Attention
from policyc.passes.base import SignalOp, register_signal

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator

_RECEIVED = Attention()  # the per-key attention of a query set, summed over its rows


@register_signal
class AttentionShare(SignalOp):
    spec = Spec("attention_share", "signal", "share of the query set's attention (mean over heads) that lands on "
                "the key set: one number per sample (ToDRE's cross-modal ratios)",
                options=(Option("flow", ("flow",), "queries -> keys, e.g. text -> vision", positional=True),),
                stages=frozenset({"llm"}), returns="number", paper="ToDRE arXiv:2505.18757")

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        flow = call.args[0] if call.args else None
        if not isinstance(flow, ir.Flow):
            raise PolicyError.at("attention_share() needs a flow like `text -> vision`", call.span)
        summed = ir.Call(fn="attention", args=(flow,), span=call.span,
                         kwargs=(ir.KwArg(name="queries", value=ir.Name(id="sum")),))
        received = _RECEIVED.compute(summed, ctx).float()  # [B, L]: Σ over query rows of head-mean attention
        total = received.sum(1, keepdim=True)  # |Q|: each row's probabilities sum to 1
        to_keys = (received * ctx.set(flow.target)).sum(1, keepdim=True)
        share = torch.where(total > 0, to_keys / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
        return share.expand_as(received)
