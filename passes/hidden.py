"""`hidden`: the residual stream of each token at this stage (the encoder layer's output, the state between
attention and MLP at `.attention` hooks, the projected features at `projector.output`): [B, L', C]."""

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
class Hidden(FeatureOp):
    spec = Spec(
        "hidden", "feature", "hidden states (the residual stream) of each token", options=(LAYER,),
        returns="feature", unimplemented=frozenset({"layer"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        if ctx.hidden is None:
            raise PolicyError.at("hidden states are not available at this stage in the runtime yet", call.span)
        return ctx.hidden
