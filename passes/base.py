"""The base class of runtime signal operators: subclasses write one method, `compute`."""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from policyc.catalog.base import Registry, Spec
from policyc.catalog.signals import SIGNALS
from policyc.errors import PolicyError, Span
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class SignalOp(ABC):
    """A per-token score read from the model at a stage (`attention`, `key_norm`, ...)."""

    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, stages, paper, one-line summary
    reads_values: ClassVar[bool] = False  # encoder stages record the layer's attention values (ctx.recorded_values)

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


def call_argument(spec: Spec, call: ir.Call, name: str, literal: Callable[[ir.Expr], ir.Expr]) -> ir.Expr | None:
    """The value of `spec`'s option `name` in `call`, given by position or by name (parameters resolved by
    `literal`), or None when it is not given."""
    positional = [o.name for o in spec.options if o.positional]
    if name in positional and positional.index(name) < len(call.args):
        return literal(call.args[positional.index(name)])
    return option_value(call.kwargs, name, literal)


class CallOperator:
    """Reading a call's arguments by the names its spec declares, defaults from the spec (functions, schedules)."""

    spec: ClassVar[Spec]

    def argument(self, call: ir.Call, name: str, ctx: StageEvaluator) -> ir.Expr | None:
        """Option `name`'s literal value (by position or name, parameters resolved), or None when not given."""
        return call_argument(self.spec, call, name, ctx.literal)

    def number(self, call: ir.Call, name: str, ctx: StageEvaluator) -> float:
        """A numeric option's value, or its declared default."""
        option = self.spec.option(name)
        default = float(option.default) if option is not None and option.default is not None else float("nan")
        return number_value(self.argument(call, name, ctx), default, f"{self.spec.name}({name}=...)", call.span)

    def word(self, call: ir.Call, name: str, ctx: StageEvaluator) -> str:
        """An enum option's word, or its declared default."""
        value = self.argument(call, name, ctx)
        if isinstance(value, ir.Name):
            return value.id
        option = self.spec.option(name)
        return option.default if option is not None and option.default is not None else ""


def number_value(value: ir.Expr | None, default: float, what: str, span: Span | None) -> float:
    """A numeric option's value (`what` names it in the error), or `default` when it is not given."""
    if value is None:
        return default
    if not isinstance(value, ir.Number):
        raise PolicyError.at(f"{what} takes a number", span)
    return float(value.value)


C = TypeVar("C", bound=type)
LOADING_PACKAGE: list[str] = ["policyc"]  # the package whose operators are being registered (policyc.operators.load)


class DeclarationError(ValueError):
    """An operator that breaks the declaration rules (policyc/operators/README in the docs), naming its package."""


def registrar(registry: dict[str, Any], what: str, instantiate: bool = True, catalog: Registry | None = None,
              kinds: tuple[str, ...] = ()) -> Callable[[C], C]:
    """A class decorator that makes an operator (an instance, or the class itself) available in `registry`
    under its name, refusing a name registered twice. An operator that declares its `spec` (its language
    signature) also registers it in `catalog`, so the checker, `policyc list` and the docs read that one
    declaration; `kinds` are the spec kinds this registry takes."""
    def register(cls: C) -> C:
        package = LOADING_PACKAGE[-1]
        spec = getattr(cls, "spec", None)
        if catalog is not None:
            _check_declaration(cls, spec, catalog, kinds, package)
            cls.name = spec.name  # type: ignore[attr-defined, union-attr]
        name = cls.name  # type: ignore[attr-defined]
        if name in registry:
            raise DeclarationError(f"{package}: {what} {name!r} is registered twice")
        try:
            operator = cls() if instantiate else cls
        except Exception as error:
            raise DeclarationError(f"{package}: {what} {name!r} ({cls.__module__}.{cls.__qualname__}) cannot be "
                                   f"instantiated: {type(error).__name__}: {error}") from error
        if catalog is not None:  # last: nothing is registered when a check fails
            catalog.add(spec, package=package)  # type: ignore[arg-type]
        registry[name] = operator
        return cls
    return register


def _check_declaration(cls: type, spec: object, catalog: Registry, kinds: tuple[str, ...], package: str) -> None:
    """Refuse a declaration the checker could not use, naming the package and the operator."""
    where = f"{package}: operator {cls.__module__}.{cls.__qualname__}"
    if spec is None:
        raise DeclarationError(f"{where}: declares no `spec = Spec(...)` (its name, kind, options and summary)")
    if not isinstance(spec, Spec):
        raise DeclarationError(f"{where}: `spec` must be a policyc.operators.Spec, not {type(spec).__name__}")
    if not spec.summary or "\n" in spec.summary or "|" in spec.summary:
        raise DeclarationError(f"{where}: the summary must be one line without '|' (it is a table cell)")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", spec.name):
        raise DeclarationError(f"{where}: name {spec.name!r} must be lower-case letters, digits and _")
    if kinds and spec.kind not in kinds:
        raise DeclarationError(f"{where}: a {cls.__mro__[1].__name__} declares kind {' or '.join(kinds)}, "
                               f"not {spec.kind!r}")
    results = getattr(cls, "results", None)  # the value types the base's method computes (functions)
    if results is not None and spec.returns not in results:
        computes = " or ".join(results) or "nothing: subclass ScoreFunction, AmountFunction or SetFunction"
        raise DeclarationError(f"{where}: a {cls.__mro__[1].__name__} computes {computes}, not {spec.returns!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise DeclarationError(f"{where}: {spec.name!r} does not implement {missing}")
    names = [o.name for o in spec.options]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DeclarationError(f"{where}: option {twice[0]!r} is declared twice")
    for option in spec.options:
        if "enum" in option.accepts and not option.choices:
            raise DeclarationError(f"{where}: enum option {option.name!r} needs `choices`")
        if option.default is not None and not isinstance(option.default, str):
            raise DeclarationError(f"{where}: option {option.name!r}'s default must be written as policy text, "
                                   f"e.g. default=\"{option.default}\"")
    unknown = sorted(spec.unimplemented - {o.name for o in spec.options})
    if unknown:
        raise DeclarationError(f"{where}: `unimplemented` names {unknown[0]!r}, which is not one of its options")
    if spec.name in catalog.entries:
        raise DeclarationError(f"{where}: {catalog.kind} {spec.name!r} is already declared by "
                               f"{catalog.packages.get(spec.name, 'policyc')}")


SIGNAL_OPS: dict[str, SignalOp] = {}
register_signal = registrar(SIGNAL_OPS, "signal operator", catalog=SIGNALS, kinds=("signal",))


def scatter_scores(values: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
    """Per-row values of the current sequence [B, L'] placed at their original positions [B, L]."""
    scores = torch.zeros(ctx.state.image.shape, dtype=values.dtype, device=values.device)
    return scores.scatter(1, ctx.state.kept, values)


def selected_first(mask: torch.Tensor) -> torch.Tensor:
    """Row indices with the selected ones first, each group in its original order: [B, L] -> [B, L]."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
