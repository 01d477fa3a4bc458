"""`frame`: each token's frame in its video (0, 1, ...), as a score: `vision where frame < 4` is the first four
frames of every video (a frame is what the model encodes as one: Qwen2-VL's groups of temporal_patch_size frames).
An image is one frame, frame 0. Read from the model's video grid at projector.output (runtime/vision.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal

from policyc.catalog.base import Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class FrameIndex(SignalOp):
    spec = Spec(
        "frame", "signal", "each token's frame in its video, 0 for the first (Qwen2-VL: a group of "
        "temporal_patch_size frames); an image is frame 0: `vision where frame < 4`",
        stages=frozenset({"projector"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        frames = getattr(ctx, "frames", None)  # [B, L] long: VisionEvaluator, where the stage reads video grids
        image = ctx.state.image
        if frames is None:
            if getattr(ctx, "causal", True):
                raise PolicyError.at("`frame` is read from the model's video grid, at projector.output", call.span)
            return torch.zeros(image.shape, device=image.device)  # images only: every token is on frame 0
        return torch.where(image, frames, 0).float()
