"""`value_energy(power=2)`: each image token's energy in an encoder layer's attention values, the sum over the
head-mean value vector's coordinates of |v_d|^power (power 2: its squared L2 norm). A token whose values carry
little energy adds little to what attention mixes into the others; a magnitude signal in the spirit of FlowCut's
`value_norm` (arXiv:2505.19536), which is the L1 norm of the same vector.

Encoder stages only: they record the layer's attention values for operators with `reads_values`.
[B, H, L', d] values -> [B, L] float over the prompt's original positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from policyc.operators import Option, SignalOp, Spec, number_value, register, scatter_scores

if TYPE_CHECKING:
    from policyc.lang import ir
    from policyc.runtime.evaluate import StageEvaluator


@register
class ValueEnergy(SignalOp):
    spec = Spec("value_energy", "signal", "energy of each token's head-mean attention value vector in an encoder "
                "layer: the sum of its coordinates' magnitudes to the power `power`",
                options=(Option("power", ("number",), "the exponent: 2 is the squared L2 norm, 1 the L1 norm",
                                default="2", low=1, high=4),),
                stages=frozenset({"encoder"}), paper="after FlowCut arXiv:2505.19536")
    reads_values = True

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        power = number_value(self.option(call, "power", ctx), 2.0, "value_energy(power=...)", call.span)
        values = ctx.recorded_values("value_energy").float().mean(1)  # [B, L', d]
        return scatter_scores(values.abs().pow(power).sum(-1), ctx)
