"""`image`: each token's image in its prompt (0 for the first, 1 for the next, ...), in prompt order, as a score:
`vision where image > 0` is every image but the first. `vision[i]` is `vision where image == i`, with negative i
counting from the last. Images are what the model encodes one at a time before the LLM (an image, a video, a tile
of Idefics3 or InternVL): `StageEvaluator.image_order`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal

from policyc.catalog.base import Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class ImageIndex(SignalOp):
    spec = Spec(
        "image", "signal", "each token's image in its prompt, 0 for the first (an image, a video, or a tile of "
        "Idefics3 and InternVL): `vision where image > 0`; `vision[i]` is image i",
        stages=frozenset({"projector", "llm"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        order, _ = ctx.image_order(call)
        return order.float()
