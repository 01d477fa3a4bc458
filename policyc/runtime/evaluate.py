"""Evaluating a stage's statements on one prefill batch: token sets, scores and selections.

Sets are boolean masks over the prompt's ORIGINAL positions, [B, L]; scores are float [B, L]
(meaningful where the set they rank is true). A stage sees only the tokens still alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.passes import SIGNAL_OPS


@dataclass
class PrefillState:
    """What one prefill knows about its prompt, and which tokens each layer keeps."""

    image: torch.Tensor  # [B, L] bool: image-token positions
    valid: torch.Tensor  # [B, L] bool: not padding
    kept: torch.Tensor  # [B, L'] long: original positions of the rows now in the sequence
    protected: torch.Tensor  # [B, L] bool
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.image.shape[1]

    def alive(self) -> torch.Tensor:
        mask = torch.zeros_like(self.image)
        return mask.scatter(1, self.kept, True)


@dataclass
class Captured:
    """A layer's post-RoPE queries and keys over the current rows, from the recording attention."""

    query: torch.Tensor  # [B, H, L', d]
    key: torch.Tensor  # [B, Hkv, L', d]
    scaling: float


@dataclass
class StageEvaluator:
    """Evaluates expressions of one stage at one layer."""

    state: PrefillState
    captured: Captured | None
    values: dict[str, ir.Expr]
    seed_offset: int = 0
    next_layer: Callable[[], Captured] | None = None  # recompute with the next layer's projections

    def builtin(self, name: str) -> torch.Tensor:
        state = self.state
        alive = state.alive() & state.valid
        positions = torch.arange(state.length, device=state.image.device).expand_as(state.image)
        first_image = torch.where(state.image, positions, state.length).amin(1, keepdim=True)
        last = torch.where(alive, positions, -1).amax(1, keepdim=True)
        sets: dict[str, Callable[[], torch.Tensor]] = {
            "vision": lambda: state.image & alive,
            "all": lambda: alive,
            "text": lambda: alive & ~state.image & (positions > first_image),
            "system": lambda: alive & (positions < first_image),
            "last": lambda: positions == last,
            "last_instruction": lambda: positions == last,
        }
        if name not in sets:
            raise PolicyError.at(f"token set '{name}' is not available in the runtime yet", None)
        return sets[name]()

    # ---------------------------------------------------------------- sets
    def set(self, expr: ir.Expr) -> torch.Tensor:
        match expr:
            case ir.Name(id=name):
                if name in self.state.sets:
                    return self.state.sets[name] & self.state.alive()
                return self.builtin(name)
            case ir.Binary(op="|", left=left, right=right):
                return self.set(left) | self.set(right)
            case ir.Binary(op="&", left=left, right=right):
                return self.set(left) & self.set(right)
            case ir.Binary(op="-", left=left, right=right):
                return self.set(left) & ~self.set(right)
            case ir.Where(source=source, condition=condition):
                return self.set(source) & self.condition(condition)
            case ir.Select(selector="top", amount=amount, source=source, by=by) if by is not None:
                return self.top(self.set(source), self.score(by), amount)
        raise PolicyError.at("this set expression is not supported by the runtime yet", expr.span)

    def top(self, candidates: torch.Tensor, score: torch.Tensor, amount: ir.Expr) -> torch.Tensor:
        """The `amount` highest-scoring candidates per sample; ties go to the earlier position."""
        chosen = torch.zeros_like(candidates)
        for row in range(candidates.shape[0]):
            positions = candidates[row].nonzero().squeeze(1)
            count = self.count(amount, positions.numel())
            order = torch.sort(score[row, positions].float(), descending=True, stable=True).indices[:count]
            chosen[row, positions[order]] = True
        return chosen

    def count(self, amount: ir.Expr, size: int) -> int:
        value = self.literal(amount)
        if isinstance(value, ir.Percent):
            return min(size, int(size * value.value // 100) if isinstance(value.value, int)
                       else int(size * value.value / 100))
        if isinstance(value, ir.Number) and isinstance(value.value, int):
            return max(0, min(size, value.value))
        raise PolicyError.at("this amount is not supported by the runtime yet", amount.span)

    def literal(self, expr: ir.Expr) -> ir.Expr:
        if isinstance(expr, ir.Name) and expr.id in self.values:
            return self.values[expr.id]
        return expr

    # ---------------------------------------------------------------- scores
    def score(self, expr: ir.Expr) -> torch.Tensor:
        expr = self.literal(expr)
        match expr:
            case ir.Number(value=value):
                return torch.full(self.state.image.shape, float(value), device=self.state.image.device)
            case ir.Name(id=name) if name in self.state.scores:
                return self.state.scores[name]
            case ir.Name(id=name) if name in SIGNAL_OPS:
                return SIGNAL_OPS[name].compute(ir.Call(fn=name), self)
            case ir.Call(fn=name) if name in SIGNAL_OPS:
                return SIGNAL_OPS[name].compute(expr, self)
            case ir.Call(fn="sum" | "mean" | "max" | "min" as fn, args=(inner,)):
                values = self.score(inner)
                masked = values.masked_fill(~self.state.image, float("nan"))
                reduced = {"sum": torch.nansum, "mean": torch.nanmean}.get(fn)
                if reduced is not None:
                    return reduced(masked, 1, keepdim=True).expand_as(values)
                fill = float("-inf") if fn == "max" else float("inf")
                pick = values.masked_fill(~self.state.image, fill)
                return (pick.amax(1, keepdim=True) if fn == "max" else pick.amin(1, keepdim=True)).expand_as(values)
            case ir.Unary(op="-", operand=operand):
                return -self.score(operand)
            case ir.Binary(op="+" | "-" | "*" | "/" as op, left=left, right=right):
                a, b = self.score(left), self.score(right)
                return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        raise PolicyError.at("this score is not supported by the runtime yet", expr.span)

    def condition(self, expr: ir.Expr) -> torch.Tensor:
        match expr:
            case ir.Binary(op="and", left=left, right=right):
                return self.condition(left) & self.condition(right)
            case ir.Binary(op="or", left=left, right=right):
                return self.condition(left) | self.condition(right)
            case ir.Unary(op="not", operand=operand):
                return ~self.condition(operand)
            case ir.Binary(op="<" | "<=" | ">" | ">=" | "==" | "!=" as op, left=left, right=right):
                a, b = self.score(left), self.score(right)
                return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
        raise PolicyError.at("this condition is not supported by the runtime yet", expr.span)

    def recorded(self, what: str) -> Captured:
        """This layer's recorded queries and keys (signals that read attention need them)."""
        if self.captured is None:
            raise PolicyError.at(f"{what} needs this layer's attention, which was not recorded", None)
        return self.captured

    def recorded_next(self, what: str) -> Captured:
        """Queries and keys recomputed with the next layer's norm, projections and RoPE (PyramidDrop)."""
        if self.next_layer is None:
            raise PolicyError.at(f"{what} with layer=next needs a next layer", None)
        return self.next_layer()
