"""The base class of runtime signal operators: subclasses write one method, `compute`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

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


C = TypeVar("C", bound=type)


def registrar(registry: dict[str, Any], what: str, instantiate: bool = True) -> Callable[[C], C]:
    """A class decorator that makes an operator (an instance, or the class itself) available in `registry`
    under `cls.name`, refusing a name registered twice."""
    def register(cls: C) -> C:
        if cls.name in registry:  # type: ignore[attr-defined]
            raise ValueError(f"{what} {cls.name!r} is registered twice")  # type: ignore[attr-defined]
        registry[cls.name] = cls() if instantiate else cls  # type: ignore[attr-defined]
        return cls
    return register


SIGNAL_OPS: dict[str, SignalOp] = {}
register_signal = registrar(SIGNAL_OPS, "signal operator")


def scatter_scores(values: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
    """Per-row values of the current sequence [B, L'] placed at their original positions [B, L]."""
    scores = torch.zeros(ctx.state.image.shape, dtype=values.dtype, device=values.device)
    return scores.scatter(1, ctx.state.kept, values)


def selected_first(mask: torch.Tensor) -> torch.Tensor:
    """Row indices with the selected ones first, each group in its original order: [B, L] -> [B, L]."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
