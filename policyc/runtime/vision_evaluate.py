"""What stages before the LLM evaluate beyond the shared `StageEvaluator`: the set function `dilate(set)`,
and amounts computed from counts, `size(set)` and `round`/`floor`/`ceil` (HiPrune's
`top round(T * alpha / 5)` and `top T - size(buffers)`), evaluated per image."""

from __future__ import annotations

import torch

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.passes.dilate import dilate
from policyc.runtime.evaluate import StageEvaluator

_ROUNDING = {"round": torch.round, "floor": torch.floor, "ceil": torch.ceil}  # torch.round: half to even, as round()


class VisionEvaluator(StageEvaluator):
    """A `StageEvaluator` for encoder and projector stages."""

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
