"""`text_relevance(tau)`: how much the question's words point at each image token (MMTok arXiv:2508.18264's
text -> vision coverage P, summed over the words).

At projector.output, per image, with u(v) = v / max(||v||, 1e-8): x = u(the projected features of the image
tokens alive), z = u(the image's question words: the LLM input embeddings of its prompt's text after it),
score_j = Σ_r softmax_j(z_r · x_j / tau) over the image tokens. 0 when the image has no question words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores
from policyc.passes.select_cover import unit

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class TextRelevance(SignalOp):
    spec = Spec("text_relevance", "signal", "softmax over vision of the similarity of question-word embeddings "
                "to each token, summed over words (MMTok, SparseVLM raters)",
                options=(Option("tau", ("number",), "softmax temperature", default="0.02", low=0),),
                stages=frozenset({"projector", "llm"}), paper="MMTok arXiv:2508.18264", runs=frozenset({"projector"}),
                needs=frozenset({"question"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        if not hasattr(ctx, "question_words") or ctx.hidden is None:
            raise PolicyError.at("text_relevance runs at projector.output only", call.span)
        tau = self.option(call, "tau", ctx)
        temperature = float(tau.value) if isinstance(tau, ir.Number) else 0.02
        words = ctx.question_words(call)  # per image [m_b, D]
        vision = ctx.builtin("vision").gather(1, ctx.state.kept)  # [B, L'] the current rows that are image tokens
        scores = torch.zeros(vision.shape, dtype=torch.float32, device=vision.device)
        for b, z in enumerate(words):
            if z.shape[0] and bool(vision[b].any()):
                x = unit(ctx.hidden[b][vision[b]])
                scores[b, vision[b]] = torch.softmax(unit(z) @ x.T / temperature, dim=1).sum(0)
        return scatter_scores(scores, ctx)
