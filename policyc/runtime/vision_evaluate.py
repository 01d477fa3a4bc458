"""What stages before the LLM evaluate beyond the shared `StageEvaluator`: the set function `dilate(set)`;
amounts computed from counts, `size(set)` and `round`/`floor`/`ceil` (HiPrune's `top round(T * alpha / 5)`
and `top T - size(buffers)`), evaluated per image; and attention read at earlier encoder layers
(`attention(..., layer=k)`, `layers=a..b`: VTC-CLS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.lang.printer import print_expr
from policyc.passes.dilate import dilate
from policyc.runtime.evaluate import Captured, StageEvaluator

_ROUNDING = {"round": torch.round, "floor": torch.floor, "ceil": torch.ceil}  # torch.round: half to even, as round()


@dataclass(frozen=True)
class LayerAttention:
    """An encoder layer's queries and keys as it ran: over its rows, with their original positions."""

    captured: Captured  # query [I, H, R, d], key [I, H, R, d]
    origin: torch.Tensor  # [I, R] long: each row's original position
    key_valid: torch.Tensor  # [I, R] bool: rows that were real keys (not padding)


def signal_layers(call: ir.Call, values: Mapping[str, ir.Expr], count: int, stage_layer: int) -> list[int] | None:
    """The encoder layers `attention(..., layer=k)` or `layers=a..b` reads, as indices 0..count-1 (None: the
    stage's own). Fails at the option when a layer does not exist or runs after `stage_layer`."""
    given = [k for k in call.kwargs if k.name in ("layer", "layers")]
    if len(given) > 1:
        raise PolicyError.at("attention() takes layer= or layers=, not both", given[1].span,
                             "layer=k reads one layer; layers=a..b sums several")
    option = given[0] if given else None
    if option is None or (isinstance(option.value, ir.Name) and option.value.id in ("here", "next")):
        return None

    def index(expr: ir.Expr) -> int:
        value = values.get(expr.id, expr) if isinstance(expr, ir.Name) else expr
        if not (isinstance(value, ir.Number) and isinstance(value.value, int)):
            raise PolicyError.at("a layer index must be a whole number", expr.span)
        if not -count <= value.value < count:
            raise PolicyError.at(f"encoder layer {value.value} does not exist: the vision encoder has {count} layers",
                                 expr.span, f"valid layers: 0..{count - 1} or -{count}..-1")
        return value.value % count

    ends = (option.value.start, option.value.stop) if isinstance(option.value, ir.Range) else (option.value,) * 2
    first, last = index(ends[0]), index(ends[1])
    if last < first:
        written = f"{print_expr(ends[0])}..{print_expr(ends[1])}"
        raise PolicyError.at(f"layer range {written} is empty on this {count}-layer encoder (layers {first}..{last})",
                             option.span,
                             "write start..stop with start at or before stop")
    if last > stage_layer:
        raise PolicyError.at(f"attention() reads encoder layer {last}, which runs after this stage (encoder layer "
                             f"{stage_layer})", option.span, "read this stage's layer or an earlier one")
    return list(range(first, last + 1))


def read_layers(statements: tuple[ir.Statement, ...], values: Mapping[str, ir.Expr], count: int,
                stage_layer: int) -> Iterator[int]:
    """Every earlier encoder layer the attention signals of `statements` read."""
    for statement in statements:
        for node in statement.walk():
            if isinstance(node, ir.Call) and node.fn == "attention":
                yield from signal_layers(node, values, count, stage_layer) or ()


@dataclass
class VisionEvaluator(StageEvaluator):
    """A `StageEvaluator` for encoder and projector stages."""

    earlier_attention: Callable[[int], tuple[Captured, torch.Tensor, torch.Tensor]] | None = None
    layer_count: int = 0  # encoder layers
    layer: int = 0  # the encoder layer the stage runs at

    def signal_layers(self, call: ir.Call) -> list[int]:
        return signal_layers(call, self.values, self.layer_count, self.layer) or [self.layer]

    def set(self, expr: ir.Expr) -> torch.Tensor:
        if isinstance(expr, ir.Call) and expr.fn == "dilate":
            patches, grid = self.patch_grid("dilate()", expr)
            radius = next((k.value for k in expr.kwargs if k.name == "radius"), None)
            radius = self.literal(radius) if radius is not None else ir.Number(value=1)
            if not (isinstance(radius, ir.Number) and isinstance(radius.value, int)):
                raise PolicyError.at("dilate(radius=...) takes a whole number", expr.span)
            return dilate(super().set(expr.args[0]), patches, grid, radius.value) & self.builtin("vision")
        return super().set(expr)

    def counts(self, amount: ir.Expr, sizes: torch.Tensor) -> torch.Tensor:
        value = self.literal(amount)
        if isinstance(value, ir.Binary | ir.Unary | ir.Call):
            wanted = self.amount(value, sizes.shape[0])
            return torch.minimum(wanted.round().long().clamp(min=0), sizes)
        return super().counts(amount, sizes)

    def amount(self, expr: ir.Expr, batch: int) -> torch.Tensor:
        """A count expression per image: [B] float64 (whole where the checker typed it a count)."""
        expr = self.literal(expr)
        device = self.state.image.device
        match expr:
            case ir.Number(value=value):
                return torch.full((batch,), float(value), dtype=torch.float64, device=device)
            case ir.Call(fn="size", args=(inner,)):
                return self.set(inner).sum(1).double()
            case ir.Call(fn=fn, args=(inner,)) if fn in _ROUNDING:
                return _ROUNDING[fn](self.amount(inner, batch))
            case ir.Unary(op="-", operand=operand):
                return -self.amount(operand, batch)
            case ir.Binary(op="+" | "-" | "*" | "/" as op, left=left, right=right):
                a, b = self.amount(left, batch), self.amount(right, batch)
                return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        raise PolicyError.at("this amount is not supported by the runtime yet", expr.span)


__all__ = ["VisionEvaluator"]
