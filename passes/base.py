"""The base class of runtime signal operators: subclasses write one method, `compute`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from policyc.errors import PolicyError, Span
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
        return option_value(call.kwargs, name, ctx.literal)


def option_value(options: Iterable[ir.KwArg], name: str, literal: Callable[[ir.Expr], ir.Expr]) -> ir.Expr | None:
    """The value of option `name` among `options` with parameters resolved by `literal`, or None."""
    value = next((k.value for k in options if k.name == name), None)
    return literal(value) if value is not None else None


def number_value(value: ir.Expr | None, default: float, what: str, span: Span | None) -> float:
    """A numeric option's value (`what` names it in the error), or `default` when it is not given."""
    if value is None:
        return default
    if not isinstance(value, ir.Number):
        raise PolicyError.at(f"{what} takes a number", span)
    return float(value.value)


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
