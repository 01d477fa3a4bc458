"""The base class of merge operators (`bipartite`, `window`, `nearest`, `pool`, `fuse`, `cluster`):
`merge METHOD(options) of SET [into SET] [by FEATURES]` folds tokens into others.

A merge op only decides who folds into whom (a `Folding`); the runtime combines the features, adds up
token sizes, keeps the earliest original patch of each group as its representative, and compacts.
Subclasses write one method, `fold`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from policyc.passes.base import number_value, option_value, registrar

from policyc.catalog.base import Spec
from policyc.catalog.merges import MERGES
from policyc.errors import PolicyError
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator

Combine = Literal["wavg", "mean", "add_mean", "weighted_sum", "soft", "add"]
LlmOrder = Literal["spatial", "code"]


@dataclass(frozen=True)
class MergeRows:
    """What a merge sees, over the current rows [B, L'] (row j is the token at original position kept[:, j])."""

    sources: torch.Tensor  # bool: rows that may fold into another (the set, minus protected tokens)
    targets: torch.Tensor  # bool: rows that may receive others (the `into` set, else the set)
    features: torch.Tensor | None  # [B, L', C] the `by` features, when given
    patches: torch.Tensor | None  # long: each row's patch index on the image grid, -1 for non-patches (CLS)
    weights: torch.Tensor | None = None  # [B, L'] float: the `by` score, for merges that weigh by a score (fuse)
    frames: torch.Tensor | None = None  # [B, L'] long: each row's frame (group) in its video, -1 for none (temporal)
    spots: torch.Tensor | None = None  # [B, L'] long: each row's spatial index within its frame, -1 for none


@dataclass(frozen=True)
class Folding:
    """A merge's decision: row j folds into row `into[b, j]` (j itself when it stays)."""

    into: torch.Tensor  # [B, L'] long
    combine: Combine  # wavg: size-weighted average; mean: plain average; add_mean: target + mean(folded);
    # weighted_sum: sum of weights * rows over the `fused` rows of a group, the receiver's own included (EViT);
    # in the LLM, mean: the plain average of the `fused` rows of a group (SparseVLM's recycling)
    order: torch.Tensor | None = None  # [B, L'] a permutation: the rows' order afterwards (ToMe's)
    weights: torch.Tensor | None = None  # [B, L'] float, for weighted_sum
    fused: torch.Tensor | None = None  # [B, L'] bool, for weighted_sum (and mean in the LLM): the rows groups combine
    # soft: row r becomes sum_j affinity[r, j] * row j / sum_j affinity[r, j] where its affinity row has mass
    # (Expedit's clusters, new tokens); `into` still says which row holds each token afterwards
    # add: row r becomes row r + sum_j affinity[r, j] * row j, its size likewise, its representative unchanged
    # (GTP-ViT's propagation: the rows folding away spread into their graph neighbours)
    affinity: torch.Tensor | None = None  # [B, L', L'] float, for soft and add
    # [B, L', L'] float: row i is rebuilt at the encoder output as sum_j spread[i, j] * row j (Expedit's
    # reconstruction); None: the rows reach the projector
    spread: torch.Tensor | None = None


class MergeOp(ABC):
    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, stages, paper, one-line summary
    # In the LLM: SET may hold tokens the stage already dropped, and each group's receiver comes back (SparseVLM)
    recycles: ClassVar[bool] = False
    # Whether each merged position has one row to take its value from when a connector reads every patch (the
    # unmerge families); False: refused there at compile time (GTP-ViT spreads a token over several rows)
    unmerges: ClassVar[bool] = True

    @abstractmethod
    def fold(self, merge: ir.Merge, rows: MergeRows, ctx: StageEvaluator) -> Folding:
        """Who folds into whom."""

    def proportional(self, merge: ir.Merge, ctx: StageEvaluator) -> bool:
        """Whether later encoder layers add log(token size) to their attention logits (ToMe)."""
        return False

    def llm_order(self, merge: ir.Merge, literal: Callable[[ir.Expr], ir.Expr]) -> LlmOrder | None:
        """The order a merge with an `order` option asks the tokens to reach the LLM in: `spatial` (each at its
        earliest patch) or `code` (the order the encoder's merges leave the rows in); None for merges without
        one (their tokens reach the LLM at their earliest patch). `literal` resolves parameters."""
        return None

    def option(self, merge: ir.Merge, name: str, ctx: StageEvaluator) -> ir.Expr | None:
        return option_value(merge.options, name, ctx.literal)

    def number(self, merge: ir.Merge, name: str, default: float, ctx: StageEvaluator) -> float:
        return number_value(self.option(merge, name, ctx), default, f"{self.name}({name}=...)", merge.span)

    def features(self, merge: ir.Merge, rows: MergeRows) -> torch.Tensor:
        if rows.features is None:
            raise PolicyError.at(f"merge {self.name} needs `by FEATURES` (e.g. by keys)", merge.span)
        return torch.nn.functional.normalize(rows.features.float(), dim=-1)

    def grid(self, merge: ir.Merge, rows: MergeRows) -> torch.Tensor:
        if rows.patches is None:
            raise PolicyError.at(f"merge {self.name} needs the image patch grid", merge.span)
        return rows.patches


MERGE_OPS: dict[str, MergeOp] = {}
register_merge = registrar(MERGE_OPS, "merge", catalog=MERGES, kinds=("merge",))


def staying(rows: torch.Tensor) -> torch.Tensor:
    """[B, L'] long: every row folding into itself."""
    return torch.arange(rows.shape[1], device=rows.device).expand(rows.shape[0], -1).clone()
