"""`random(seed=s)`: uniform random scores; ranking by them is random pruning, a strong baseline.

One `torch.Generator` seeded with `seed + layer` draws `rand(B, L)` over the prompt's positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal

from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class RandomScore(SignalOp):
    name = "random"
    options = frozenset({"seed"})

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        seed = self.option(call, "seed", ctx)
        base = int(seed.value) if isinstance(seed, ir.Number) else 0
        generator = torch.Generator(device="cpu").manual_seed(base + ctx.seed_offset)
        return torch.rand(ctx.state.image.shape, generator=generator).to(ctx.state.image.device)
