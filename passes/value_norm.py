"""`value_norm`: the L1 norm of each token's attention value vector, mean over heads (FlowCut's
information-flow magnitude, arXiv:2505.19536). Encoder stages: the layer's values, [B, H, L', d] -> [B, L]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores
from policyc.passes.values import head_mean_values

from policyc.catalog.base import Spec
from policyc.catalog.signals import LAYER
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class ValueNorm(SignalOp):
    spec = Spec(
        "value_norm", "signal", "L1 norm of each token's head-mean value vector (FlowCut)", options=(LAYER,),
        paper="FlowCut arXiv:2505.19536", runs=frozenset({"encoder"}), unimplemented=frozenset({"layer"}))
    reads_values = True

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        return scatter_scores(head_mean_values(call, ctx, "value_norm reads encoder values").abs().sum(-1), ctx)
