"""`key_norm`: the L2 norm of each token's attention key, mean over heads (from the recorded keys)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Spec
from policyc.catalog.signals import LAYER
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class KeyNorm(SignalOp):
    spec = Spec(
        "key_norm", "signal", "L2 norm of each token's attention key (mean over heads)", options=(LAYER,),
        runs=frozenset({"encoder", "llm"}), unimplemented=frozenset({"layer"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        key = ctx.recorded("key_norm").key  # [B, Hkv, L', d]
        return scatter_scores(key.float().norm(dim=-1).mean(1), ctx)
