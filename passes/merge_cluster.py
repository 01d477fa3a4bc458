"""`merge cluster(clusters=10%, knn=clusters, share=100%, rank=SCORE) of SET by FEATURES`: SparseVLM's token
recycling (Zhang et al., arXiv:2410.04417; Gumpest/SparseVLMs `cluster_and_merge`, algorithms.md §9 "Recycling").

Of the n tokens of SET (typically `dropped`: those the stage's `keep` just removed), the floor(share * n) + 1
ranked highest by `rank` are recycled (SparseVLM: the top 30% (+1) by the stage's relevance; share=0% recycles
none; without `rank`, position order). They are clustered with DPC-kNN on the features (`dpc_knn`), and each
cluster becomes ONE token, the plain mean of its members, in the slot of its centre: the centre's row comes back
(alive, whether or not the stage had dropped it) holding the mean, the other members are gone.
clusters=P% makes floor(P% * m) + 1 clusters of the m recycled tokens (SparseVLM's floor(m / 10) + 1), a count
makes that many (at most m); knn defaults to the number of clusters, as SparseVLM's code sets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge, staying

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


def dpc_knn(x: torch.Tensor, clusters: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering with a kNN density (Du et al., 2016; TCFormer's and SparseVLM's variant) of
    tokens x [m, C]: returns the centres [clusters] (indices into x, best first) and each token's cluster [m]
    (an index into the centres).

    d_ij = ||x_i - x_j|| / sqrt(C); density rho_i = exp(-mean of d^2 to the knn nearest tokens, itself included);
    delta_i = the distance to the nearest denser token (the largest d_ij of all for the densest one); the centres
    are the `clusters` tokens of highest delta * rho, and every token joins its nearest centre (a centre its own).
    Ties, which SparseVLM's code breaks with 1e-6 of random noise on rho, go to the earlier token here: an equal
    density counts as denser when the token comes first, equal scores rank the earlier token first, and a token
    equally near two centres joins the better-ranked one.
    """
    m = x.shape[0]
    x = x.float()
    distance = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / x.shape[1] ** 0.5
    nearest = torch.topk(distance, min(knn, m), dim=1, largest=False).values  # [m, knn]
    density = torch.exp(-(nearest**2).mean(1))  # [m]
    earlier = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1)  # [i, j]: j comes before i
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & earlier)
    parent = torch.where(denser, distance, torch.inf).amin(1)  # [m]: inf for the densest
    parent = torch.where(torch.isinf(parent), distance.max(), parent)
    order = torch.sort(parent * density, descending=True, stable=True).indices
    centres = order[: min(clusters, m)]
    assign = distance[centres].argmin(0)  # [m]: the first nearest centre
    assign[centres] = torch.arange(len(centres), device=x.device)
    return centres, assign


def recycled_count(share: ir.Expr, n: int) -> int:
    """How many of n tokens `share` recycles: floor(share * n) + 1 (SparseVLM's top 30% (+1)), none at 0%."""
    percent = share.value if isinstance(share, ir.Percent) else 100
    if percent == 0 or n == 0:
        return 0
    taken = n * percent // 100 if isinstance(percent, int) else int(n * percent / 100)
    return min(n, int(taken) + 1)


def cluster_count(amount: ir.Expr, m: int) -> int:
    """Clusters of m tokens: a count (at most m), or floor(P% * m) + 1 for P% (SparseVLM's floor(m / 10) + 1)."""
    if isinstance(amount, ir.Percent):
        percent = amount.value
        taken = m * percent // 100 if isinstance(percent, int) else int(m * percent / 100)
        return min(m, int(taken) + 1)
    if isinstance(amount, ir.Number) and isinstance(amount.value, int) and amount.value >= 1:
        return min(m, amount.value)
    raise PolicyError.at("cluster(clusters=...) takes a count or a percentage", amount.span)


@register_merge
class Cluster(MergeOp):
    spec = Spec(
        "cluster", "merge", "recycle tokens (typically `dropped`): cluster the best-ranked share with DPC-kNN and "
        "make each cluster one token, the mean of its members, in its centre's slot (SparseVLM's recycling)",
        options=(Option("clusters", ("count", "percent"), "clusters: a count, or floor(P% of the clustered) + 1",
                        default="10%"),
                 Option("knn", ("number",), "neighbours for the density estimate (default: the cluster count)",
                        default="clusters", low=1, integer=True),
                 Option("share", ("percent",), "recycle the floor(share of SET) + 1 ranked highest; 0% none",
                        default="100%"),
                 Option("rank", ("score",), "the score ranking SET for `share` (default: position order)",
                        default="position")),
        returns="set", by="feature", paper="SparseVLM arXiv:2410.04417",
        runs=frozenset({"llm"}))
    recycles = True

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        if rows.features is None:
            raise PolicyError.at("merge cluster needs `by FEATURES` (e.g. by hidden)", merge.span)
        clusters = self.option(merge, "clusters", ctx) or ir.Percent(value=10)
        knn = self.option(merge, "knn", ctx)
        share = self.option(merge, "share", ctx) or ir.Percent(value=100)
        rank = self.option(merge, "rank", ctx)
        # [B, L'] the ranking score of the current rows (position order without one)
        score = (ctx.score(rank).gather(1, ctx.state.kept).float() if rank is not None
                 else -torch.arange(rows.sources.shape[1], dtype=torch.float, device=rows.sources.device)
                 .expand(rows.sources.shape))
        into, fused = staying(rows.sources), torch.zeros_like(rows.sources)
        for b in range(rows.sources.shape[0]):
            members = rows.sources[b].nonzero().flatten()  # ascending rows
            best = members[torch.sort(score[b, members], descending=True, stable=True).indices]
            picked = best[: recycled_count(share, len(members))]
            if len(picked) == 0:
                continue
            k = cluster_count(clusters, len(picked))
            neighbours = k if knn is None else int(self.number(merge, "knn", k, ctx))
            centres, assign = dpc_knn(rows.features[b, picked], k, neighbours)
            into[b, picked] = picked[centres[assign]]
            fused[b, picked] = True
        return Folding(into, "mean", fused=fused)
