"""`keys`: each token's attention key at this layer, mean over heads (ToMe's merge metric, arXiv:2210.09461;
VisionZip's contextual assignment, arXiv:2412.04467). Read from the recorded attention: [B, H, L', d] -> [B, L', d].

In the LLM, post-RoPE keys: plain `keys` are the stage layer's own; `keys(layer=next)` are recomputed with the next
layer's norm, k projection and RoPE from the stage layer's output (VisionDrop's metric, arXiv:2506.22283, taken
from the same recomputation as `attention(..., layer=next)`)."""

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
class Keys(FeatureOp):
    spec = Spec(
        "keys", "feature", "attention keys of each token, mean over heads (ToMe's metric)", options=(LAYER,),
        returns="feature", paper="ToMe arXiv:2210.09461", runs=frozenset({"encoder", "llm"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        layer = next((k.value for k in call.kwargs if k.name == "layer"), None)
        if isinstance(layer, ir.Name) and layer.id == "next":
            return ctx.recorded_next("keys(layer=next)").key.mean(1)
        if layer is not None and not (isinstance(layer, ir.Name) and layer.id == "here"):
            raise PolicyError.at("keys(layer=...) takes `next` (in the LLM) in the runtime so far", call.span)
        return ctx.recorded("keys").key.mean(1)
