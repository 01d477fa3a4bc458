"""`cover AMOUNT of SET by FEATURES`: greedy maximum coverage of the question and the image (MMTok
arXiv:2508.18264, Ironieser/MMTok `SemanticTokenSelector.mm_coverage_selection`).

Per image, over its n candidate tokens, with u(v) = v / max(||v||, 1e-8) row-wise:
  x  = u(FEATURES)                         [n, D]  (`by`: the projected features at projector.output)
  xc = u(encoder feature-layer features)   [n, E]  (what the projector reads: CLIP/SigLIP patches)
  z  = u(question word embeddings)         [m, D]  (the LLM's input embeddings of the image's prompt words)
  P = softmax(z xᵀ / tau_text, dim=vision) / m          text -> vision coverage   [m, n]
  Q = softmax(xc xcᵀ / tau_vision, dim=1) / n           vision -> vision coverage [n, n]
  C = cat(P, alpha · Q)                                  [m + n, n]
Then `amount` times j* = argmax_j Σ_r max(0, C[r, j] - best[r]) over the unchosen j (ties to the earlier
token), best = max(best, C[:, j*]). The kept tokens stay in their original order. With no question words
(m = 0) only the vision rows remain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.selectors import SelectorOp, register_selector

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of x scaled to unit length, as MMTok does (norm clamped at 1e-8): [n, C] float32."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def coverage(features: torch.Tensor, encoder: torch.Tensor, words: torch.Tensor, alpha: float, tau_text: float,
             tau_vision: float) -> torch.Tensor:
    """C = cat(P, alpha · Q): [m + n, n] float32 for n tokens (features [n, D], encoder [n, E]) and m words [m, D]."""
    x, xc, z = unit(features), unit(encoder), unit(words)
    n, m = x.shape[0], z.shape[0]
    vision = torch.softmax(xc @ xc.T / tau_vision, dim=1) / n
    if m == 0:
        return alpha * vision
    text = torch.softmax(z @ x.T / tau_text, dim=1) / m
    return torch.cat([text, alpha * vision])


def greedy_cover(combined: torch.Tensor, count: int) -> list[int]:
    """Indices (in choice order) of `count` columns of `combined` [rows, n] picked by greedy max coverage."""
    n = combined.shape[1]
    best = combined.new_zeros(combined.shape[0])
    taken = torch.zeros(n, dtype=torch.bool, device=combined.device)
    chosen: list[int] = []
    for _ in range(min(count, n)):
        gain = (combined - best[:, None]).clamp(min=0).sum(0).masked_fill(taken, float("-inf"))
        pick = int(gain.argmax())  # the first maximum: ties go to the earlier token
        chosen.append(pick)
        taken[pick] = True
        best = torch.maximum(best, combined[:, pick])
    return chosen


@register_selector
class Cover(SelectorOp):
    spec = Spec(
        "cover", "selector", "greedy maximum coverage of the question's words (by the `by` features) and of the "
        "image tokens (by the encoder features the projector reads) (MMTok)",
        options=(Option("alpha", ("number",), "weight of vision-to-vision coverage", default="0.5", low=0),
                 Option("tau_text", ("number",), "text-vision temperature", default="0.02", low=0),
                 Option("tau_vision", ("number",), "vision-vision temperature", default="0.2", low=0),
                 Option("words", ("enum",), "question words: the prompt's text tokens after the image, or "
                        "MMTok's keyword filter", default="prompt", choices=("prompt", "keywords"))),
        returns="set", by="feature", stages=frozenset({"projector", "llm"}), paper="MMTok arXiv:2508.18264",
        runs=frozenset({"projector"}), needs=frozenset({"question"}))

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("cover needs `by FEATURES`", node.span)
        if not (hasattr(ctx, "projector_input") and hasattr(ctx, "question_words")):
            raise PolicyError.at("cover runs at projector.output only", node.span)
        encoder = ctx.projector_input(node)  # [B, L, E] at original positions
        words = ctx.question_words(node)  # per image [m_b, D]
        alpha, tau_text, tau_vision = (self.number(node, name, default, ctx) for name, default in
                                       (("alpha", 0.5), ("tau_text", 0.02), ("tau_vision", 0.2)))
        features = ctx.features_at(node.by)  # [B, L, D] at original positions
        return self.per_sample(node, candidates, ctx, lambda b, positions, count: greedy_cover(
            coverage(features[b, positions], encoder[b, positions], words[b], alpha, tau_text, tau_vision), count))
