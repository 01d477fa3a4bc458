"""`centroid_similarity(SET)`: the cosine similarity of each token's hidden state to the mean hidden state of the
tokens of SET (CATP arXiv:2508.07871, Stage 2: sim(h_c^K, v̄_q^K) with v̄_q^K the mean over the query sample, and
sim(h_q^(K+1), v̄_c^(K+1)) with v̄_c the mean over the surviving context image tokens).

In an LLM stage, per prompt: m = mean over SET's tokens of h ([C], h the layer's output), score_j = h_j · m /
(max(||h_j||, 1e-8) · max(||m||, 1e-8)), in float32. A prompt whose SET is empty has no mean: its scores are 0
(a selection among its tokens is then decided by order alone; gate it on the set, as policies/catp.tokpol does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class CentroidSimilarity(SignalOp):
    spec = Spec("centroid_similarity", "signal", "cosine similarity of each token's hidden state to the mean hidden "
                "state of a token set (CATP stage 2)",
                options=(Option("to", ("set",), "the tokens whose mean hidden state is compared", positional=True),),
                stages=frozenset({"llm"}), paper="CATP arXiv:2508.07871")

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        if not call.args or ctx.hidden is None:
            raise PolicyError.at("centroid_similarity(SET) compares the hidden states of an LLM stage", call.span)
        hidden = ctx.hidden.float()  # [B, L', C] the current rows
        members = torch.gather(ctx.set(call.args[0]), 1, ctx.state.kept).to(hidden.dtype)  # [B, L']
        count = members.sum(1, keepdim=True)  # [B, 1]
        mean = (members[:, :, None] * hidden).sum(1) / count.clamp(min=1)  # [B, C]
        unit = mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        rows = hidden / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        scores = torch.einsum("blc,bc->bl", rows, unit).masked_fill(count == 0, 0.0)
        return scatter_scores(scores, ctx)
