"""The base class of selector operators (`top`, `stride`, `grid`, `diverse`): `SELECTOR AMOUNT of SET [by ...]`
picks a token set. Subclasses write one method, `select`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from policyc.passes.allocate import selection_counts
from policyc.passes.base import number_value, option_value, registrar, selected_first

from policyc.catalog.base import Spec
from policyc.catalog.selectors import SELECTORS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class SelectorOp(ABC):
    """Picks `amount` tokens of a candidate set."""

    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, stages, paper, one-line summary

    @abstractmethod
    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        """The chosen tokens, a subset of `candidates`: [B, L] bool over original positions."""

    def option(self, node: ir.Select, name: str, ctx: StageEvaluator) -> ir.Expr | None:
        """An option's literal value (parameters resolved), or None when not given."""
        return option_value(node.options, name, ctx.literal)

    def number(self, node: ir.Select, name: str, default: float, ctx: StageEvaluator) -> float:
        """A numeric option's value, or `default` when not given."""
        return number_value(self.option(node, name, ctx), default, f"{self.name}({name}=...)", node.span)

    def per_sample(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator,
                   pick: Callable[[int, torch.Tensor, int], Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """Greedy selectors, one sample at a time: `pick(b, positions, count)` returns indices into the
        sample's candidate `positions` (ascending original positions); the chosen set, [B, L] bool."""
        sizes = candidates.sum(1)
        counts = selection_counts(node, candidates, ctx)
        order = selected_first(candidates)
        chosen = torch.zeros_like(candidates)
        for b in range(candidates.shape[0]):
            positions = order[b, : int(sizes[b])]
            chosen[b, positions[pick(b, positions, int(counts[b]))]] = True
        return chosen


SELECTOR_OPS: dict[str, SelectorOp] = {}
register_selector = registrar(SELECTOR_OPS, "selector", catalog=SELECTORS, kinds=("selector",))


def ranked(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the first `counts[b]` positions of each row of `order` ([B, L] positions, best first)."""
    take = torch.arange(order.shape[1], device=order.device)[None] < counts[:, None]
    return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter(1, order, take)
