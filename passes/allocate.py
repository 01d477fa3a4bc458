"""`top(allocate=S) K of vision by ...` (also `diverse` before the LLM): one budget per sample, split across the
sample's images (or tiles) in proportion to a per-image weight, as GlobalCom2 (arXiv:2501.05179) gives each crop
its own retention ratio from a global budget and HiRED (arXiv:2408.10945) splits a token budget across image
partitions by their share of the CLS attention.

The rule (`allocate`): a sample's images have sizes n_i (their candidate tokens) and weights w_i >= 0 (the sum of
S over each image's candidates; `equal`: 1 each; weights below zero count as zero; all zero: equal). The budget
is K = AMOUNT of the sample's N = sum n_i candidates (a count as given, a percentage of N truncated, as for one
image), at most N.
1. Shares by water-filling: q_i = min(n_i, lambda * w_i) with sum q_i = K: images whose proportional share
   reaches their size keep all their tokens, and the rest of the budget is split again over the others, by weight.
2. Whole counts by largest remainder: c_i = floor(q_i), and the K - sum c_i tokens left go one each to the images
   with the largest fractional parts q_i - c_i (ties: the earlier image). So sum c_i = K and c_i <= n_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from policyc.passes.base import option_value

from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


def allocate(budget: int, weights: Sequence[float], sizes: Sequence[int]) -> list[int]:
    """Split `budget` tokens over images of `sizes` by `weights` (the rule above): per image counts, summing to
    min(budget, sum(sizes)), each at most its size."""
    budget = max(0, min(budget, sum(sizes)))
    weights = [max(0.0, float(w)) if math.isfinite(w) else 0.0 for w in weights]
    if sum(w for w, n in zip(weights, sizes, strict=True) if n > 0) <= 0:
        weights = [1.0] * len(sizes)
    shares = [0.0] * len(sizes)
    free = [i for i, n in enumerate(sizes) if n > 0]
    left = float(budget)
    while free:
        total = sum(weights[i] for i in free)
        if total <= 0:  # every image left has weight zero: they share the rest equally
            weights = [1.0 if i in free else w for i, w in enumerate(weights)]
            total = float(len(free))
        full = [i for i in free if left * weights[i] / total >= sizes[i]]
        if not full:
            for i in free:
                shares[i] = left * weights[i] / total
            break
        for i in full:
            shares[i] = float(sizes[i])
            left -= sizes[i]
        free = [i for i in free if i not in full]
    counts = [min(sizes[i], math.floor(share)) for i, share in enumerate(shares)]
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in order[: budget - sum(counts)]:
        counts[i] += 1
    return counts


def allocating(node: ir.Select, ctx: StageEvaluator) -> ir.Expr | None:
    """The `allocate` option's score (or the word `equal`), None when it is absent or `none`."""
    value = option_value(node.options, "allocate", ctx.literal)
    if value is None or (isinstance(value, ir.Name) and value.id == "none"):
        return None
    return value


def allocated_counts(node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
    """Per image (a batch row of the stage), how many of its `candidates` [I, L] it keeps: the sample's budget
    split across the sample's images by the rule above. [I] long."""
    by = allocating(node, ctx)
    samples = ctx.image_samples(node)  # type: ignore[attr-defined]  # [I] long, VisionEvaluator
    sizes = candidates.sum(1)
    if isinstance(by, ir.Name) and by.id == "equal":
        weights = torch.ones(candidates.shape[0], dtype=torch.float64)
    else:
        score = ctx.score(by).double()  # type: ignore[arg-type]
        weights = torch.where(candidates, score, torch.zeros_like(score)).sum(1).cpu()
    counts = torch.zeros_like(sizes)
    for sample in samples.unique().tolist():
        images = (samples == sample).nonzero().flatten().tolist()
        image_sizes = [int(sizes[i]) for i in images]
        budget = ctx.count(node.amount, sum(image_sizes), images[0])
        split = allocate(budget, [float(weights[i]) for i in images], image_sizes)
        for image, count in zip(images, split, strict=True):
            counts[image] = count
    return counts


def image_shares(node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> list[tuple[torch.Tensor,
                                                                                               torch.Tensor]]:
    """In the LLM, where a row is a prompt: per image i of the prompts, its candidates ([B, L] bool) and how many
    of them each prompt keeps ([B] long), the prompt's budget split across its images by the rule above."""
    order, _ = ctx.image_order(node)
    by = allocating(node, ctx)
    score = None if isinstance(by, ir.Name) and by.id == "equal" else ctx.score(by).double()  # type: ignore[arg-type]
    images = int(order.amax()) + 1
    parts = [candidates & (order == i) for i in range(images)]
    sizes = torch.stack([part.sum(1) for part in parts], 1).cpu()  # [B, I]
    weights = sizes.new_ones(sizes.shape, dtype=torch.float64) if score is None else torch.stack(
        [torch.where(part, score, torch.zeros_like(score)).sum(1) for part in parts], 1).cpu()
    counts = torch.zeros_like(sizes)
    budgets = ctx.counts(node, candidates & (order >= 0)).cpu()  # [B] the prompt's budget over its image tokens
    for row in range(sizes.shape[0]):
        counts[row] = torch.tensor(allocate(int(budgets[row]), weights[row].tolist(), sizes[row].tolist()))
    return [(part, counts[:, i].to(part.device)) for i, part in enumerate(parts)]


def selection_counts(node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
                     score: torch.Tensor | None = None) -> torch.Tensor:
    """How many candidates each row keeps: the amount per row, or per image by allocation. [B] long. `score`: the
    selection's score [B, L], where the selector computed it (adaptive schedules read it)."""
    if allocating(node, ctx) is None:
        return ctx.counts(node, candidates, score)
    if not hasattr(ctx, "image_samples"):
        raise PolicyError.at(f"{node.selector}(allocate=...) in the LLM is not implemented: there `top` splits a "
                             "prompt's budget across its images", node.span,
                             "use top(allocate=...) in the LLM, or this selector at projector.output")
    return allocated_counts(node, candidates, ctx)
