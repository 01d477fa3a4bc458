"""`keys`: each token's attention key at this layer, mean over heads (ToMe's merge metric, arXiv:2210.09461;
VisionZip's contextual assignment, arXiv:2412.04467). Read from the recorded attention: [B, H, L', d] -> [B, L', d]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.features import FeatureOp, register_feature

from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_feature
class Keys(FeatureOp):
    name = "keys"

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        return ctx.recorded("keys").key.mean(1)
