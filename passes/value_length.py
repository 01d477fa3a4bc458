"""`value_length`: the Euclidean length of each token's attention value vector, heads concatenated (ATS's ||v_j||_2,
Fayyaz et al., ECCV'22, `AdaptiveTokenSampler.score_assignment_step`). Encoder stages: the layer's values
[B, H, L', d] -> [B, L]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class ValueLength(SignalOp):
    spec = Spec("value_length", "signal", "L2 norm of each token's value vector, heads concatenated (ATS)",
                stages=frozenset({"encoder"}), paper="ATS arXiv:2111.15667")
    reads_values = True

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        recorded = getattr(ctx, "attention_values", None)  # [B, H, L', d], where the stage's layer recorded them
        if recorded is None:
            raise PolicyError.at("value_length reads the attention values of an encoder layer", call.span,
                                 "read it in an encoder.layer[...] stage")
        recorded = recorded.float()
        return scatter_scores(recorded.square().sum((1, 3)).sqrt(), ctx)
