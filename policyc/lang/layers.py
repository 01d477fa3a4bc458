"""Layer selections: `llm.layer[2, 6]`, `[2..14 step 4]`, `[-2]`, `[*]`, and indices relative to the model.

A layer index is a whole number (negative ones count from the end), an integer parameter, or arithmetic on
them and `depth`, the hook's layer count (the LLM's for `llm.layer`, the encoder's for `encoder.layer`):
`llm.layer[depth / 4 - 1, depth / 2 - 1]` is PyramidDrop's quarter boundaries on any model. An index is
computed exactly and rounded down (`depth / 4 - 1` is 6 on a 30-layer model). Indices written with `depth`
are known when a policy is bound to a model (`static_layers` leaves them open; `bound_layers` resolves them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from policyc.errors import PolicyError, suggestion
from policyc.lang import ir
from policyc.lang.printer import print_expr
from policyc.lang.resolve import Scope

DEPTH = "depth"
"""The name of a hook's layer count inside a layer selection."""


@dataclass(frozen=True, order=True)
class Linear:
    """`per_depth * depth + offset`, exact: the value of a layer expression for every depth."""

    per_depth: Fraction
    offset: Fraction

    @property
    def relative(self) -> bool:
        return self.per_depth != 0

    def at(self, depth: int) -> int:
        return math.floor(self.per_depth * depth + self.offset)


def linear(expr: ir.Expr, scope: Scope, assignments: Mapping[str, ir.Expr] | None = None,
           what: str = "a layer index") -> Linear:
    """The value of a layer expression as a linear function of `depth`; a `PolicyError` at the misused node."""
    match expr:
        case ir.Number(value=int(value)):
            return Linear(Fraction(0), Fraction(value))
        case ir.Name(id=name) if name == DEPTH:
            return Linear(Fraction(1), Fraction(0))
        case ir.Name(id=name):
            value = scope.value(name, assignments)
            if value is None:
                raise PolicyError.at(f"unknown parameter '{name}' in a layer selection", expr.span,
                                     suggestion(name, [p.name for p in scope.policy.params] + [DEPTH], "names"))
            if not (isinstance(value, ir.Number) and isinstance(value.value, int)):
                raise PolicyError.at(f"{what} must be whole: parameter '{name}' holds {print_expr(value)}",
                                     expr.span, "give the parameter a whole default, e.g. param layer = 2")
            return Linear(Fraction(0), Fraction(value.value))
        case ir.Unary(op="-", operand=operand):
            inner = linear(operand, scope, assignments, what)
            return Linear(-inner.per_depth, -inner.offset)
        case ir.Binary(op="+" | "-" | "*" | "/" as op, left=left, right=right):
            a, b = linear(left, scope, assignments, what), linear(right, scope, assignments, what)
            return _combine(op, a, b, expr)
    raise PolicyError.at(f"{what} must be a whole number, an integer parameter or arithmetic on them and "
                         f"`{DEPTH}`, not {print_expr(expr)}", expr.span,
                         "write e.g. llm.layer[2], llm.layer[layer] or llm.layer[depth / 2 - 1]")


def _combine(op: str, a: Linear, b: Linear, expr: ir.Expr) -> Linear:
    if op == "+":
        return Linear(a.per_depth + b.per_depth, a.offset + b.offset)
    if op == "-":
        return Linear(a.per_depth - b.per_depth, a.offset - b.offset)
    if op == "*":
        if a.relative and b.relative:
            raise PolicyError.at(f"{print_expr(expr)} multiplies depth by itself", expr.span,
                                 "a layer index scales depth by a number: depth * 3 / 4")
        factor, term = (b.offset, a) if a.relative else (a.offset, b)
        return Linear(term.per_depth * factor, term.offset * factor)
    if b.relative:
        raise PolicyError.at(f"{print_expr(expr)} divides by depth", expr.span,
                             "a layer index divides depth by a number: depth / 4")
    if b.offset == 0:
        raise PolicyError.at(f"{print_expr(expr)} divides by zero", expr.span)
    return Linear(a.per_depth / b.offset, a.offset / b.offset)


@dataclass(frozen=True)
class LayerItem:
    """One entry of a layer list, as linear functions of depth: `start`, or `start..stop step step`."""

    start: Linear
    stop: Linear | None
    step: Linear | None
    node: ir.LayerRange

    @property
    def relative(self) -> bool:
        return any(v is not None and v.relative for v in (self.start, self.stop, self.step))


def layer_items(hook: ir.Hook, scope: Scope, assignments: Mapping[str, ir.Expr] | None = None,
                ) -> tuple[LayerItem, ...] | None:
    """The entries of a hook's layer list, checked as far as they can be without a model; None for `[*]` or
    no selection."""
    if not isinstance(hook.layers, ir.LayerList):
        return None
    items = []
    for node in hook.layers.items:
        start = _index(node.start, scope, assignments)
        stop = _index(node.stop, scope, assignments) if node.stop is not None else None
        step = linear(node.step, scope, assignments, "a layer step") if node.step is not None else None
        if step is not None and not step.relative and (step.offset <= 0 or step.offset.denominator != 1):
            raise PolicyError.at("a layer step must be a positive whole number", node.step.span if node.step
                                 else node.span)
        items.append(LayerItem(start, stop, step, node))
    return tuple(items)


def _index(expr: ir.Expr, scope: Scope, assignments: Mapping[str, ir.Expr] | None) -> Linear:
    value = linear(expr, scope, assignments)
    if not value.relative:
        if value.offset.denominator != 1:
            raise PolicyError.at(f"layer index {print_expr(expr)} is {float(value.offset):g}, not a whole number",
                                 expr.span, "a fraction of the model's layers is written with depth: depth / 4")
        return value
    if not 0 < value.per_depth <= 1:
        raise PolicyError.at(f"layer index {print_expr(expr)} scales depth by {value.per_depth}: an index lies "
                             "between layer 0 and depth - 1", expr.span,
                             "scale depth by a share of it, e.g. depth / 4 or depth * 3 / 4")
    if value.per_depth == 1 and value.offset >= 0:
        raise PolicyError.at(f"layer index {print_expr(expr)} is past the last layer of every model", expr.span,
                             "the last layer is depth - 1 (or -1)")
    return value


def static_layers(hook: ir.Hook, scope: Scope, assignments: Mapping[str, ir.Expr] | None = None,
                  ) -> tuple[int, ...] | None:
    """The layer indices a hook lists, as written (negative ones count from the end); None for `[*]`, no
    selection, or indices written with `depth`. Parameters resolve through `scope` (and search `assignments`)."""
    items = layer_items(hook, scope, assignments)
    if items is None or any(item.relative for item in items):
        return None
    layers: list[int] = []
    for item in items:
        layers.extend(_expand(item, int(item.start.offset), None if item.stop is None else int(item.stop.offset)))
    _no_repeats(hook, layers)
    return tuple(layers)


def bound_layers(hook: ir.Hook, scope: Scope, assignments: Mapping[str, ir.Expr] | None, depth: int,
                 label: str) -> tuple[int, ...] | None:
    """The layer indices a hook lists on a model of `depth` layers at its hook: indices written with `depth`
    resolved (an error if one falls before layer 0), others as written; None for `[*]` or no selection."""
    items = layer_items(hook, scope, assignments)
    if items is None:
        return None
    layers: list[int] = []
    for item in items:
        if not item.relative:
            layers.extend(_expand(item, int(item.start.offset), None if item.stop is None else int(item.stop.offset)))
            continue
        start, stop = (_at(v, n, depth, label) for v, n in ((item.start, item.node.start),
                                                             (item.stop, item.node.stop)))
        layers.extend(_expand(item, start, stop, depth))
    return tuple(layers)  # repeats are found by the caller, once negative indices are mapped too


def _at(value: Linear | None, node: ir.Expr | None, depth: int, label: str) -> int | None:
    if value is None or node is None:
        return None
    index = value.at(depth)
    if value.relative and index < 0:
        raise PolicyError.at(f"{label}: {print_expr(node)} is layer {index} on this {depth}-layer model", node.span,
                             f"an index written with depth must land in 0..{depth - 1}; write a larger one")
    return index


def _expand(item: LayerItem, start: int, stop: int | None, depth: int | None = None) -> list[int]:
    """`start`, or `start..stop step` (inclusive); absolute negative ends map onto `depth` when it is known."""
    if stop is None:
        return [start]
    node = item.node
    step = 1 if item.step is None else item.step.at(depth or 0)
    if step <= 0:
        raise PolicyError.at(f"layer step {print_expr(node.step) if node.step else step} is {step} on this "  # type: ignore[arg-type]
                             f"{depth}-layer model; a step must be positive", node.span)
    if depth is not None:
        start, stop = (k + depth if k < 0 else k for k in (start, stop))
    if (start < 0) != (stop < 0) or stop < start:
        written = f"{print_expr(node.start)}..{print_expr(node.stop)}"  # type: ignore[arg-type]
        raise PolicyError.at(f"layer range {start}..{stop} is empty or mixes indices from both ends" if depth is None
                             else f"layer range {written} is {start}..{stop} on this {depth}-layer model: empty",
                             node.span, "write start..stop with start <= stop, both counted from the same end")
    return list(range(start, stop + 1, step))


def _no_repeats(hook: ir.Hook, layers: list[int]) -> None:
    repeated = next((k for i, k in enumerate(layers) if k in layers[:i]), None)
    if repeated is not None:
        where = f" (first at line {hook.span.line})" if hook.span else ""
        raise PolicyError.at(f"duplicate layer '{repeated}'{where}", hook.span)


def order_key(hook: ir.Hook, scope: Scope) -> Linear:
    """Where a stage's first layer lies, for ordering stages before a model is known: negative indices count
    from the end (`-2` is depth - 2), so stages sort as they run on a model deep enough for all of them."""
    items = layer_items(hook, scope)
    if not items:
        return Linear(Fraction(0), Fraction(0))
    first = items[0].start
    return Linear(Fraction(1), first.offset) if not first.relative and first.offset < 0 else first


def layer_count(hook: ir.Hook, scope: Scope) -> int | None:
    """How many layers a stage runs at, when known without a model (a list of single indices, or static)."""
    items = layer_items(hook, scope)
    if items is None:
        return None
    if all(item.stop is None for item in items):
        return len(items)
    layers = static_layers(hook, scope)
    return None if layers is None else len(layers)


def uses_names(hook: ir.Hook) -> bool:
    """Whether a hook's layers are written with parameters or `depth` (checked only once a model is bound)."""
    if not isinstance(hook.layers, ir.LayerList):
        return False
    parts = [p for item in hook.layers.items for p in (item.start, item.stop, item.step) if p is not None]
    return any(isinstance(node, ir.Name) for part in parts for node in part.walk())


__all__ = ["DEPTH", "LayerItem", "Linear", "bound_layers", "layer_count", "layer_items", "linear", "order_key",
           "static_layers", "uses_names"]
