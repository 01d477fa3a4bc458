"""`shot`: each token's in-context sample (shot) in its prompt, as a score: the index of the last image at or before it
(-1 before the first image). In an interleaved few-shot prompt [I_1 T_1] ... [I_q T_q] the tokens of image i and its
paired text share shot i, so `all where shot == max(image)` is the query sample: its image and the text after
it (CATP arXiv:2508.07871's query-sample tokens). LLM stages only: the prompt's text is not there before the LLM.
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
class ShotIndex(SignalOp):
    spec = Spec("shot", "signal", "each token's in-context sample (shot): the index of the last image at or before it "
                "(-1 before the first): `all where shot == max(image)` is the query image and its text",
                stages=frozenset({"llm"}), paper="CATP arXiv:2508.07871")

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        order, _ = ctx.image_order(call)  # [B, L] the image index at image tokens, -1 elsewhere
        return torch.cummax(order, dim=1).values.float()  # images are numbered in prompt order
