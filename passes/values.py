"""`values`: each token's attention value vector at this encoder layer, mean over heads (the vectors FlowCut's
`value_norm` measures, arXiv:2505.19536). Read from the recorded values: [B, H, L', d] -> [B, L', d]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.features import FeatureOp, register_feature

from policyc.catalog.base import Spec
from policyc.catalog.signals import LAYER
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_feature
class Values(FeatureOp):
    spec = Spec("values", "feature", "attention values of each token, mean over heads", options=(LAYER,),
                returns="feature", runs=frozenset({"encoder"}), unimplemented=frozenset({"layer"}))
    reads_values = True

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        return head_mean_values(call, ctx, "values reads encoder attention values: encoder stages only")


def head_mean_values(call: ir.Call, ctx: StageEvaluator, refusal: str) -> torch.Tensor:
    """The encoder layer's attention values of the current rows, mean over heads: [B, L', d] (`refusal` where the
    stage records none)."""
    values = getattr(ctx, "recorded_values", None)
    if values is None:
        raise PolicyError.at(refusal, call.span)
    return values(call.fn).float().mean(1)
