"""`facility AMOUNT of SET by FEATURES`: greedy facility location plus alignment with the image's paired text
(CATP arXiv:2508.07871, §"Stage 1", written from the paper: no code is public).

Per image, over its n candidate tokens, with u(v) = v / max(||v||, 1e-8) row-wise:
  x  = u(FEATURES)                                     [n, D]  (`by`: the projected features at projector.output)
  v̄  = mean of the image's paired-text embeddings      [D]     (the LLM input embeddings of the text after the
                                                                image, up to the next image or the prompt's end)
  S  = ŝim(x xᵀ)                                       [n, n]  similarity of every token pair
  a  = ŝim(x · u(v̄))                                   [n]     alignment of every token with the paired text
  F(Y) = Σ_i max_{j∈Y} S[i, j] + lam · Σ_{j∈Y} a[j]     facility location + alignment (monotone submodular)
ŝim rescales the cosine to [0, 1]: (cos + 1) / 2 (`rescale=shift`, default; the paper leaves it open) or
max(cos, 0) (`rescale=clamp`). Then `amount` times j* = argmax_j Σ_i max(0, S[i, j] - best[i]) + lam · a[j] over
the unchosen j, best = max(best, S[:, j*]), best starting at 0 (F(∅) = 0). Ties go to the earlier token, a tie
being a gain within TIE of the largest: on a symmetric similarity two tokens that cover each other tie exactly
(1 + S[i, j] - best[i] - best[j] both), and rounding must not decide. In float64. An image with no paired text has
no alignment term. The kept tokens stay in their original order.
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

RESCALES = ("shift", "clamp")
TIE = 1e-9  # gains this close to the largest are equal (exact ties, apart from rounding)


def unit64(x: torch.Tensor) -> torch.Tensor:
    """Rows of x in float64 scaled to unit length (norm clamped at 1e-8): [n, C]."""
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def rescaled(cosine: torch.Tensor, rescale: str) -> torch.Tensor:
    """Cosine similarities mapped to [0, 1]: (cos + 1) / 2 for `shift`, max(cos, 0) for `clamp`."""
    return (cosine + 1) / 2 if rescale == "shift" else cosine.clamp(min=0)


def greedy_facility(features: torch.Tensor, words: torch.Tensor, lam: float, rescale: str, count: int) -> list[int]:
    """Indices (in choice order) of `count` of n tokens (features [n, D]) greedily maximising facility location
    plus lam times the alignment with the mean of `words` [m, D] (no alignment when m = 0)."""
    x = unit64(features)
    similarity = rescaled(x @ x.T, rescale)  # [n, n], row i: how well token j represents token i
    n = x.shape[0]
    if words.shape[0]:
        alignment = lam * rescaled(x @ unit64(words.mean(0, keepdim=True))[0], rescale)  # [n]
    else:
        alignment = x.new_zeros(n)
    best = x.new_zeros(n)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    chosen: list[int] = []
    for _ in range(min(count, n)):
        gain = (similarity - best[:, None]).clamp(min=0).sum(0) + alignment
        gain = gain.masked_fill(taken, float("-inf"))
        pick = int((gain >= gain.max() - TIE).int().argmax())  # the first of the (near-)largest: the earlier token
        chosen.append(pick)
        taken[pick] = True
        best = torch.maximum(best, similarity[:, pick])
    return chosen


@register_selector
class Facility(SelectorOp):
    spec = Spec("facility", "selector", "greedy facility location over the image's tokens plus lam times their "
                "similarity to the mean embedding of the image's paired text (CATP stage 1)",
                options=(Option("lam", ("number",), "weight of the alignment with the paired text", default="0.7",
                                low=0),
                         Option("rescale", ("enum",), "cosine to [0, 1]: (cos + 1) / 2 or max(cos, 0)",
                                default="shift", choices=RESCALES)),
                returns="set", by="feature", stages=frozenset({"projector"}), paper="CATP arXiv:2508.07871",
                needs=frozenset({"question"}))

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("facility needs `by FEATURES`", node.span)
        if not hasattr(ctx, "question_words"):
            raise PolicyError.at("facility runs at projector.output only", node.span)
        words = ctx.question_words(node)  # per image [m_b, D]
        lam = self.number(node, "lam", 0.7, ctx)
        word = self.option(node, "rescale", ctx)
        rescale = word.id if isinstance(word, ir.Name) else "shift"
        features = ctx.features_at(node.by)  # [B, L, D] at original positions
        return self.per_sample(node, candidates, ctx, lambda b, positions, count: greedy_facility(
            features[b, positions], words[b], lam, rescale, count))
