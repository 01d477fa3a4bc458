"""`diverse AMOUNT of SET by FEATURES`: greedy diversity selection (DivPrune arXiv:2503.02175).

Distances d(i, j) = 1 - cos(x_i, x_j) (metric=cosine) or ||x_i - x_j|| (metric=l2). The first token is the
most isolated one: the largest distance to its nearest other token (DivPrune: argmax of each column's
second-smallest distance, the smallest being the token itself). Then, greedily, objective=min adds the
token whose smallest distance to the chosen ones is largest (max-min, farthest-point sampling), and
objective=sum the one whose summed distance to them is largest (max-sum, ToDRE v2). Ties go to the
earlier position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.selectors import SelectorOp, register_selector

from policyc.catalog.base import Option, Spec
from policyc.catalog.selectors import ALLOCATE
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


def distances(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise distances of the rows of x [n, C]: [n, n] float32."""
    x = x.float()
    if metric == "l2":
        return torch.cdist(x, x)
    unit = torch.nn.functional.normalize(x, dim=-1)
    return 1 - unit @ unit.T


def greedy(dist: torch.Tensor, count: int, objective: str) -> list[int]:
    """Indices (in choice order) of `count` rows chosen greedily from the distance matrix [n, n]."""
    n = dist.shape[0]
    if count <= 0 or n == 0:
        return []
    isolation = dist.kthvalue(2, dim=0).values if n > 1 else dist[0]
    chosen = [int(isolation.argmax())]
    spread = dist[chosen[0]].clone()
    taken = torch.zeros(n, dtype=torch.bool, device=dist.device)
    taken[chosen[0]] = True
    for _ in range(1, min(count, n)):
        pick = int(spread.masked_fill(taken, float("-inf")).argmax())
        chosen.append(pick)
        taken[pick] = True
        spread = torch.minimum(spread, dist[pick]) if objective == "min" else spread + dist[pick]
    return chosen


@register_selector
class Diverse(SelectorOp):
    spec = Spec(
        "diverse", "selector", "greedy max-min diversity over features, seeded with the most isolated token "
        "(DivPrune; ToDRE's k-center); objective=sum gives greedy max-sum",
        options=(Option("metric", ("enum",), "distance", default="cosine", choices=("cosine", "l2")),
                 Option("objective", ("enum",), "max-min or max-sum", default="min", choices=("min", "sum")),
                 ALLOCATE),
        returns="set", by="feature", paper="DivPrune arXiv:2503.02175",
        runs=frozenset({"encoder", "projector"}))

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        if node.by is None:
            raise PolicyError.at("diverse needs `by FEATURES`", node.span)
        metric, objective = self.option(node, "metric", ctx), self.option(node, "objective", ctx)
        metric_name = metric.id if isinstance(metric, ir.Name) else "cosine"
        objective_name = objective.id if isinstance(objective, ir.Name) else "min"
        features = ctx.features_at(node.by)  # [B, L, C] at original positions
        return self.per_sample(node, candidates, ctx, lambda b, positions, count: greedy(
            distances(features[b, positions], metric_name), count, objective_name))
