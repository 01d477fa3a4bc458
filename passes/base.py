"""The base class of runtime signal operators: subclasses write one method, `compute`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class SignalOp(ABC):
    """A per-token score read from the model at a stage (`attention`, `key_norm`, ...)."""

    name: ClassVar[str]  # the catalog name (policyc.catalog.signals)
    options: ClassVar[frozenset[str]] = frozenset()  # options this implementation honours

    @abstractmethod
    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        """The score over the prompt's original positions, [B, L] float (only alive tokens matter)."""

    def option(self, call: ir.Call, name: str, ctx: StageEvaluator) -> ir.Expr | None:
        """An option's literal value (parameters resolved), or None when not given."""
        value = next((k.value for k in call.kwargs if k.name == name), None)
        return ctx.literal(value) if value is not None else None


SIGNAL_OPS: dict[str, SignalOp] = {}
S = TypeVar("S", bound=type[SignalOp])


def register_signal(cls: S) -> S:
    """Class decorator: make a signal operator available under `cls.name`."""
    if cls.name in SIGNAL_OPS:
        raise ValueError(f"signal operator {cls.name!r} is registered twice")
    SIGNAL_OPS[cls.name] = cls()
    return cls


def scatter_scores(values: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
    """Per-row values of the current sequence [B, L'] placed at their original positions [B, L]."""
    scores = torch.zeros(ctx.state.image.shape, dtype=values.dtype, device=values.device)
    return scores.scatter(1, ctx.state.kept, values)


def selected_first(mask: torch.Tensor) -> torch.Tensor:
    """Row indices with the selected ones first, each group in its original order: [B, L] -> [B, L]."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
