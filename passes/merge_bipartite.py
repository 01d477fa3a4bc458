"""`merge bipartite(r=R, proportional=true, order=spatial) of SET by FEATURES`: ToMe's bipartite soft matching
(arXiv:2210.09461; facebookresearch/ToMe `bipartite_soft_matching`).

The current rows are split alternately into A (rows 0, 2, ...) and B (rows 1, 3, ...). Each A row of the
set is matched to its most similar B row of the set (cosine of the features, ToMe: head-mean keys); the
r best-matched A rows fold into their matches by size-weighted average. r = min(r, |set| // 2), and the
smallest such r over the batch so every image keeps as many rows. Afterwards the rows are ordered as ToMe's
code orders them with a class token: the unmerged A rows in their order, then the B rows (so later layers
split the same A and B as ToMe). (Without a class token ToMe's code leaves the unmerged A rows in similarity
order; here they always keep their order.) With proportional=true later encoder layers add log(size) to
their attention logits. `order` says how the tokens reach the LLM: `spatial`, each at its earliest patch
(the runtime's representative slot), or `code`, in the row order the encoder's merges left (ToMe's code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from policyc.passes.base import option_value
from policyc.passes.merges import Folding, LlmOrder, MergeOp, MergeRows, register_merge, staying

from policyc.catalog.base import Option, Spec
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_merge
class Bipartite(MergeOp):
    spec = Spec(
        "bipartite", "merge", "ToMe bipartite soft matching: split alternately, merge the r most similar pairs "
        "by size-weighted average, tracking token sizes; the tokens reach the LLM each at its earliest patch "
        "(`order=spatial`: LLaVA's raster order, which its LLM was trained on) or in the order ToMe's code leaves "
        "them (`order=code`: after each merge the unmerged A tokens, then all B tokens)",
        options=(Option("r", ("count", "schedule"), "tokens removed per layer", positional=False),
                 Option("proportional", ("enum",), "add log(size) to attention logits (proportional attention)",
                        default="true", choices=("true", "false")),
                 Option("order", ("enum",), "the order the tokens reach the LLM in: `spatial`, each at its earliest "
                        "patch (LLaVA's raster order, which its LLM was trained on); `code`, the order ToMe's code "
                        "leaves the rows in (after each merge the unmerged A tokens, then all B tokens); encoder "
                        "layers of towers that hand their rows to the LLM as they are (LLaVA)",
                        default="spatial", choices=("spatial", "code"))),
        returns="set", by="feature", stages=frozenset({"encoder", "projector"}), paper="ToMe arXiv:2210.09461")

    def proportional(self, merge: ir.Merge, ctx: StageEvaluator) -> bool:
        value = self.option(merge, "proportional", ctx)
        return not (isinstance(value, ir.Name) and value.id == "false")

    def llm_order(self, merge: ir.Merge, literal: Callable[[ir.Expr], ir.Expr]) -> LlmOrder:
        value = option_value(merge.options, "order", literal)
        return "code" if isinstance(value, ir.Name) and value.id == "code" else "spatial"

    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        r_value = self.option(merge, "r", ctx)
        if not (isinstance(r_value, ir.Number) and isinstance(r_value.value, int)):
            raise PolicyError.at("bipartite(r=...) takes a whole number in the runtime so far", merge.span)
        metric = self.features(merge, rows)  # [B, L', C] unit vectors
        best, match, order = KERNELS["bipartite_match"](metric, rows.sources, rows.targets)  # [B, |A|] each
        return bipartite_folding(rows, r_value.value, best, match, order)


def bipartite_folding(rows: MergeRows, r: int, best: torch.Tensor, match: torch.Tensor, order: torch.Tensor,
                      ) -> Folding:
    """ToMe's merge step (shared by `bipartite` and `turbo`): the first r A rows of `order` [B, |A|] (ranked
    best first) fold into their B matches `match` [B, |A|] by size-weighted average, r clipped to
    min(|set| // 2, matchable A rows) over the batch (`best` [B, |A|]: -inf where an A row may not fold).
    Afterwards the rows are ordered unmerged A, then B (ToMe's code with a class token); r = 0 changes nothing."""
    width = rows.sources.shape[1]
    members = (rows.sources | rows.targets).sum(1)
    matchable = torch.isfinite(best).sum(1)
    r = min(r, int(torch.minimum(members // 2, matchable).min()) if width else 0)
    into = staying(rows.sources)
    if r <= 0:
        return Folding(into, "wavg")
    src = order[:, :r]  # A indices that fold
    into.scatter_(1, 2 * src, 2 * match.gather(1, src) + 1)
    folded_a = torch.zeros_like(best, dtype=torch.bool).scatter(1, src, True)  # [B, |A|]
    is_a = torch.arange(width, device=best.device) % 2 == 0
    stays_a = torch.zeros(rows.sources.shape, dtype=torch.bool, device=best.device)
    stays_a[:, ::2] = ~folded_a
    rank = torch.where(stays_a, 0, torch.where(is_a[None], 2, 1))  # unmerged A, then B, then folded A
    return Folding(into, "wavg", order=selected_first_by(rank))


def selected_first_by(rank: torch.Tensor) -> torch.Tensor:
    """Row indices sorted by a small integer rank, stably: [B, L'] -> [B, L']."""
    return torch.sort(rank.to(torch.int8), dim=1, stable=True).indices

