"""`merge propagate(r=P, score=SCORE, alpha=0.1, graph=mixed, neighbours=8, scale=true) of SET`: GTP-ViT's graph
token propagation (Xu et al., "GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation", WACV'24;
Ackesnal/GTP-ViT `models_v3.py` `select`, `propagate`, `GraphProp`; algorithms-more.md §8).

The graph is built on the encoder's input, the first layer's input rows x [P, C] of the image's patches (CLS
outside it): spatial[i, j] = 1 for the 8 grid neighbours, semantic[i, j] = 1 when x_j is among the `neighbours`
best cosine matches of x_i (j ≠ i); G = spatial OR semantic (`mixed`), or either alone; G ← D^-1/2 G D^-1/2 with D
the row degree. Every layer reads G at the current rows' ORIGINAL patches: built once, only sub-indexed, never
renormalised. Of the rows in SET (protected tokens excluded), the r = min(P, n - 1) with the lowest score leave
(ties: the later row, as a descending stable sort keeps the earlier); each spreads into its kept graph neighbours:
x_k += alpha · G[k, p] x_p and size_k += alpha · G[k, p] size_p over the leaving rows p. A leaving token with no kept
neighbour is lost. `scale=true` (GTP's token scale) adds log(size) to later layers' attention logits. Kept rows keep
their own positions (their order reaching the LLM is raster order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.merges import Folding, MergeOp, MergeRows, register_merge

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Propagate(MergeOp):
    spec = Spec("propagate", "merge", "GTP-ViT's graph propagation: the lowest-scoring tokens leave, each added into "
                "its kept neighbours on a normalised patch graph of the encoder's input, weighted by alpha",
                options=(Option("r", ("count",), "tokens removed per layer"),
                         Option("score", ("score",), "which tokens stay (the highest), e.g. mixed_attention"),
                         Option("alpha", ("number",), "propagation weight", default="0.1", low=0),
                         Option("graph", ("enum",), "the patch graph: 8-neighbourhood, top-k cosine, or their union",
                                default="mixed", choices=("mixed", "spatial", "semantic")),
                         Option("neighbours", ("number",), "cosine neighbours per patch (semantic, mixed)",
                                default="8", low=1, integer=True),
                         Option("scale", ("enum",), "token scale: add log(size) to later attention logits",
                                default="true", choices=("true", "false"))),
                stages=frozenset({"encoder"}), paper="GTP-ViT WACV'24")
    unmerges = False  # a leaving token lives on in several rows (or none): no row to unmerge it from

    def proportional(self, merge: ir.Merge, ctx: StageEvaluator) -> bool:
        value = self.option(merge, "scale", ctx)
        return not (isinstance(value, ir.Name) and value.id == "false")

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        r_value, score = self.option(merge, "r", ctx), self.option(merge, "score", ctx)
        if not (isinstance(r_value, ir.Number) and isinstance(r_value.value, int)):
            raise PolicyError.at("propagate(r=...) takes a whole number", merge.span)
        if score is None:
            raise PolicyError.at("merge propagate needs score=SCORE", merge.span, "score=mixed_attention")
        tower_input = getattr(ctx, "tower_input", None)
        if tower_input is None:
            raise PolicyError.at("merge propagate runs in vision encoder layers", merge.span)
        patches = self.grid(merge, rows)  # [B, L'] each row's patch, -1 for CLS
        graph = self.graph(merge, ctx, tower_input(merge))  # [B, P, P]
        values = ctx.score(score).gather(1, ctx.state.kept).float()  # [B, L']
        candidates = rows.sources & (patches >= 0)
        count = candidates.sum(1, keepdim=True)
        removed = torch.minimum(torch.full_like(count, r_value.value), (count - 1).clamp(min=0))
        order = torch.sort(values.masked_fill(~candidates, float("-inf")), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order))
        leaving = candidates & (rank >= count - removed)  # [B, L'] the lowest `removed` of the candidates
        staying = rows.targets & (patches >= 0) & ~leaving
        clamped = patches.clamp(min=0)
        batch = torch.arange(patches.shape[0], device=patches.device)[:, None, None]
        weights = graph[batch, clamped[:, :, None], clamped[:, None, :]]  # [B, L', L'] G at the rows' patches
        affinity = self.number(merge, "alpha", 0.1, ctx) * weights * (staying[:, :, None] & leaving[:, None, :])
        own = torch.arange(patches.shape[1], device=patches.device).expand_as(patches)
        # `into` only names a staying row to hold the leaving one's place: its strongest kept neighbour (a lost
        # token: the first staying row); the rows it reaches are the affinity's, its representative slot is gone
        receiver = torch.where(staying[:, :, None], weights, -1.0).argmax(1)  # [B, L']
        return Folding(torch.where(leaving, receiver, own), "add", affinity=affinity)

    def graph(self, merge: ir.Merge, ctx: StageEvaluator, embedded: torch.Tensor) -> torch.Tensor:
        """GTP's normalised patch graph D^-1/2 G D^-1/2 [B, P, P] from the encoder's input [B, L, C]."""
        positions, (grid_rows, grid_cols) = ctx.patches, ctx.grid_shape()  # [B, L] patch of each position
        count = grid_rows * grid_cols
        if positions is None or bool(((positions >= 0).sum(1) != count).any()):
            raise PolicyError.at("merge propagate needs every patch of the image grid in the encoder", merge.span)
        ids = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        at = torch.zeros(positions.shape[0], count + 1, dtype=torch.long, device=positions.device).scatter(
            1, torch.where(positions >= 0, positions, count), ids)[:, :count]  # [B, P] the position of each patch
        x = embedded.float().gather(1, at[:, :, None].expand(-1, -1, embedded.shape[-1]))  # [B, P, C] patch order
        ys = torch.arange(count, device=x.device) // grid_cols
        xs = torch.arange(count, device=x.device) % grid_cols
        eye = torch.eye(count, dtype=torch.bool, device=x.device)
        spatial = ((ys[:, None] - ys[None]).abs() <= 1) & ((xs[:, None] - xs[None]).abs() <= 1) & ~eye
        kind = self.option(merge, "graph", ctx)
        kind = kind.id if isinstance(kind, ir.Name) else "mixed"
        edges = spatial.expand(x.shape[0], -1, -1)
        if kind != "spatial":
            unit = torch.nn.functional.normalize(x, dim=-1)
            cosine = (unit @ unit.transpose(1, 2)).masked_fill(eye, float("-inf"))
            k = min(int(self.number(merge, "neighbours", 8, ctx)), count - 1)
            semantic = torch.zeros_like(eye).expand_as(cosine).scatter(2, cosine.topk(k, dim=2).indices, True)
            edges = semantic if kind == "semantic" else edges | semantic
        edges = edges.float()
        inverse_root = edges.sum(2).pow(-0.5).nan_to_num(posinf=0.0)  # [B, P] D^-1/2 (0 where no edge)
        return inverse_root[:, :, None] * edges * inverse_root[:, None, :]
