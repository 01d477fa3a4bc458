"""`sample AMOUNT of SET by SCORE`: ATS's inverse-transform sampling (Fayyaz et al., "Adaptive Token Sampling for
Efficient Vision Transformers", ECCV'22, arXiv:2111.15667; adaptivetokensampling/ATS
`AdaptiveTokenSampler.inverse_transform_sampling`, `create_ys`, `get_unique_indices`; algorithms-more.md §6).

Per image, over the m candidates with scores s (ATS: the normalised significance):
    sort s ascending (ties: the earlier position first); cdf = cumsum; c = (cdf - min cdf) / (max cdf - min cdf)
    y_t = y0 + t * (1 - y0) / (n - 1), t = 0..n-1, y0 = the smallest non-zero c, n = `samples`
    pick_t = the first sorted index j with the smallest |y_t - c_j|
The distinct picks stay: an adaptive count, at most m. Tokens owning a large step of the cdf are hit, flat
low-significance stretches yield few distinct picks, and the least significant token (c = 0) is never picked.
n defaults to the image's tokens before any drop (ATS: N0 - 1, the patches of its input, in every block).
AMOUNT caps the kept count: when more distinct picks remain, the most significant of them stay (ATS's code keeps
the first, least significant ones, which its released configuration, with no cap, never reaches). Where c is
undefined (under two candidates, or no score mass above the least significant) the candidates with a positive
score stay. The kept tokens keep their positions (ATS's code emits them by ascending significance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.allocate import selection_counts
from policyc.passes.selectors import SelectorOp, register_selector

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError

if TYPE_CHECKING:
    from policyc.lang import ir
    from policyc.runtime.evaluate import StageEvaluator


def inverse_transform_picks(score: torch.Tensor, samples: int) -> torch.Tensor:
    """ATS's sampling of one image's candidates `score` [m] with `samples` evenly spaced cdf levels: the distinct
    picks as indices into `score`, most significant first [k] (k <= m)."""
    order = torch.sort(score, stable=True).indices  # ascending significance
    cdf = torch.cumsum(score[order].double(), 0)
    low, high = cdf.min(), cdf.max()
    if len(score) < 2 or not bool(high > low):
        positive = (score > 0).nonzero().flatten()
        return positive[torch.sort(score[positive], descending=True, stable=True).indices]
    levels = (cdf - low) / (high - low)  # [m]
    y0 = levels[levels != 0].min()
    steps = torch.arange(samples, dtype=torch.float64, device=score.device)
    ys = y0 + steps * (1 - y0) / max(samples - 1, 1)  # [samples]
    picks = (ys[:, None] - levels[None, :]).abs().argmin(1)  # the first nearest level
    return order[torch.unique(picks).flip(0)]


@register_selector
class Sample(SelectorOp):
    spec = Spec("sample", "selector", "ATS's inverse-transform sampling: the distinct tokens hit by evenly spaced "
                "levels of the score's cumulative distribution (an adaptive count, capped by the amount: the most "
                "significant stay)",
                options=(Option("samples", ("count",), "cdf levels (ATS: the image's tokens before any drop)",
                                default="original", low=2, integer=True),),
                returns="set", by="score", stages=frozenset({"encoder", "projector"}), paper="ATS arXiv:2111.15667")

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("sample needs `by SCORE`", node.span)
        score = ctx.score(node.by).float()  # [B, L]
        caps = selection_counts(node, candidates, ctx)  # [B]
        given = self.option(node, "samples", ctx)
        original = ctx.state.image.sum(1) if given is None else None  # [B] the image's tokens before any drop
        chosen = torch.zeros_like(candidates)
        for b in range(candidates.shape[0]):
            positions = candidates[b].nonzero().flatten()
            samples = int(original[b]) if original is not None else int(self.number(node, "samples", 2, ctx))
            picks = inverse_transform_picks(score[b, positions], samples)[: int(caps[b])]
            chosen[b, positions[picks]] = True
        return chosen
