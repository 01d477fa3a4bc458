"""The base classes of function operators: what a function of scores, counts or sets computes in a stage.

A function's spec (kind "function") says what it returns, and its base is the one that computes that:
- `ScoreFunction.score`: a score over the tokens ([B, L] float): `normalize`, `ema`, `softmax`, `exp`, and the
  reductions `sum`, `mean`, `max`, `min`, whose one value per row is broadcast over the row;
- `AmountFunction.amount`: an amount per row ([B] float64) in a selection's count: `size`, `round`, `floor`, `ceil`;
- `SetFunction.members`: a token set ([B, L] bool): `dilate`.
Subclasses write that one method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from policyc.passes.base import CallOperator, registrar

from policyc.catalog.base import Option, Spec, ValueType
from policyc.catalog.functions import FUNCTIONS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class FunctionOp(CallOperator, ABC):
    """A function usable in score, amount or set expressions."""

    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, what it returns, stages, paper, summary
    results: ClassVar[tuple[ValueType, ...]] = ()  # the `spec.returns` this base computes


class ScoreFunction(FunctionOp):
    """A score computed from scores (or numbers, broadcast over the tokens)."""

    results = ("score", "same", "number")

    @abstractmethod
    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        """The value at every original position, [B, L] float (only alive image tokens matter)."""


class AmountFunction(FunctionOp):
    """A count computed per row (an image before the LLM, a prompt in it), for a selection's amount."""

    results = ("count",)

    @abstractmethod
    def amount(self, call: ir.Call, ctx: StageEvaluator, batch: int) -> torch.Tensor:
        """The amount of each of the `batch` rows, [B] float64 (the selection rounds and clamps it)."""


class SetFunction(FunctionOp):
    """A token set computed from sets."""

    results = ("set",)

    @abstractmethod
    def members(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        """The set over original positions, [B, L] bool."""


class ElementwiseFunction(ScoreFunction):
    """`f(x)` applied to each token's value (and to numbers): subclasses write `apply`."""

    @staticmethod
    def unary_spec(name: str, summary: str) -> Spec:
        """The spec of `name(x)`, which returns the type it is given (a score or a number)."""
        return Spec(name, "function", summary, options=(Option("x", ("score", "number"), "input", positional=True),),
                    returns="same")

    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        return self.apply(ctx.score(call.args[0]))

    @abstractmethod
    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L]."""


class ReductionFunction(ScoreFunction):
    """One value per row from a score over the image tokens still alive, broadcast over the row: subclasses write
    `reduce`."""

    @staticmethod
    def reduction_spec(name: str, summary: str) -> Spec:
        return Spec(name, "function", summary, options=(Option("x", ("score",), "per-token score", positional=True),),
                    returns="number")

    def score(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        values = ctx.score(call.args[0])
        return self.reduce(values, ctx.builtin("vision")).expand_as(values)

    @abstractmethod
    def reduce(self, values: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
        """values [B, L] float, over [B, L] bool (the tokens reduced) -> [B, 1]."""


class RoundingFunction(AmountFunction):
    """`f(x)` of a count expression, rounded to a whole number: subclasses write `apply`."""

    @staticmethod
    def rounding_spec(name: str, summary: str) -> Spec:
        return Spec(name, "function", summary,
                    options=(Option("x", ("number", "count"), "input", positional=True),), returns="count")

    def amount(self, call: ir.Call, ctx: StageEvaluator, batch: int) -> torch.Tensor:
        return self.apply(ctx.amount(call.args[0], batch))

    @abstractmethod
    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """[B] float64 -> [B] float64, whole numbers."""


FUNCTION_OPS: dict[str, FunctionOp] = {}
register_function = registrar(FUNCTION_OPS, "function", catalog=FUNCTIONS, kinds=("function",))
