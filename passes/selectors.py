"""The base class of selector operators (`top`, `stride`, `grid`, `diverse`): `SELECTOR AMOUNT of SET [by ...]`
picks a token set. Subclasses write one method, `select`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class SelectorOp(ABC):
    """Picks `amount` tokens of a candidate set."""

    name: ClassVar[str]  # the catalog name (policyc.catalog.selectors)
    options: ClassVar[frozenset[str]] = frozenset()  # options this implementation honours

    @abstractmethod
    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        """The chosen tokens, a subset of `candidates`: [B, L] bool over original positions."""

    def option(self, node: ir.Select, name: str, ctx: StageEvaluator) -> ir.Expr | None:
        """An option's literal value (parameters resolved), or None when not given."""
        value = next((k.value for k in node.options if k.name == name), None)
        return ctx.literal(value) if value is not None else None


SELECTOR_OPS: dict[str, SelectorOp] = {}
S = TypeVar("S", bound=type[SelectorOp])


def register_selector(cls: S) -> S:
    """Class decorator: make a selector available under `cls.name`."""
    if cls.name in SELECTOR_OPS:
        raise ValueError(f"selector {cls.name!r} is registered twice")
    SELECTOR_OPS[cls.name] = cls()
    return cls


def ranked(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the first `counts[b]` positions of each row of `order` ([B, L] positions, best first)."""
    take = torch.arange(order.shape[1], device=order.device)[None] < counts[:, None]
    return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter(1, order, take)
