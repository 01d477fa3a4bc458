"""`random(seed=s)`: uniform random scores; ranking by them is random pruning, a strong baseline.

Each sample draws its own numbers from a fresh `torch.Generator` seeded with `seed + layer`: `rand(n)` over its
n non-padding positions, in order. A sample therefore scores the same wherever it sits in a batch and whatever
its padding (issue 9: same input, same kept tokens); two samples of the same length draw the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class RandomScore(SignalOp):
    spec = Spec(
        "random", "signal", "uniform random score: ranking by it is random pruning (a strong baseline)",
        options=(Option("seed", ("number",), "random seed", default="0", integer=True, low=0),))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        seed = self.option(call, "seed", ctx)
        base = int(seed.value) if isinstance(seed, ir.Number) else 0
        valid = ctx.state.valid.cpu()
        scores = torch.zeros(valid.shape)
        for row, row_valid in enumerate(valid):
            generator = torch.Generator(device="cpu").manual_seed(base + ctx.seed_offset)
            scores[row, row_valid] = torch.rand(int(row_valid.sum()), generator=generator)
        return scores.to(ctx.state.image.device)
