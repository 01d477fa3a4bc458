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
from policyc.lang.printer import print_expr
from policyc.passes import (
    FEATURE_OPS,
    FUNCTION_OPS,
    SCHEDULE_OPS,
    SELECTOR_OPS,
    SIGNAL_OPS,
    AmountFunction,
    ScoreFunction,
    SetFunction,
)
from policyc.runtime.guards import check_scores
from policyc.runtime.row_folds import RowFold


@dataclass
class PrefillState:
    """What one prefill knows about its prompt, and which tokens each layer keeps."""

    image: torch.Tensor  # [B, L] bool: image-token positions
    valid: torch.Tensor  # [B, L] bool: not padding
    kept: torch.Tensor  # [B, L'] long: original positions of the rows now in the sequence
    protected: torch.Tensor  # [B, L] bool
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    formulas: dict[str, ir.Expr] = field(default_factory=dict)  # score name -> its definition (`definition`)
    origins: dict[str, torch.Tensor] = field(default_factory=dict)  # stage label -> [B] image tokens before it
    # [B, L] bool: dropped tokens. Set once samples of a batch keep different counts: a sample keeping fewer rows
    # carries some of its dropped tokens on as fillers (masked everywhere), so the batch stays rectangular.
    dead: torch.Tensor | None = None
    images: torch.Tensor | None = None  # [B, L] long: each position's image in its prompt (0, 1, ...), -1 elsewhere
    folds: list[RowFold] = field(default_factory=list)  # the LLM merges so far, in order (runtime/row_folds.py)

    @property
    def length(self) -> int:
        return self.image.shape[1]

    def alive(self) -> torch.Tensor:
        mask = torch.zeros_like(self.image).scatter(1, self.kept, True)
        return mask if self.dead is None else mask & ~self.dead

    def live(self) -> torch.Tensor | None:
        """[B, L'] bool: which current rows are tokens rather than fillers (None: all are)."""
        if self.dead is None:
            return None
        return ~torch.gather(self.dead, 1, self.kept)


@dataclass
class Captured:
    """A layer's post-RoPE queries and keys over the current rows, from the recording attention."""

    query: torch.Tensor  # [B, H, L', d]
    key: torch.Tensor  # [B, Hkv, L', d]
    scaling: float
    # [B, L', L'] bool: which key row each query row may see, from the model's own mask where it is not plain
    # causal (Gemma 3: bidirectional image blocks, sliding windows); None: causal over the current rows.
    visible: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # [B, L'] the logit bias the layer added to each key (ToMe's log(size))


@dataclass
class StageEvaluator:
    """Evaluates expressions of one stage at one layer."""

    state: PrefillState
    captured: Captured | None
    values: dict[str, ir.Expr]
    seed_offset: int = 0
    next_layer: Callable[[], Captured] | None = None  # recompute with the next layer's projections
    # the previous LLM layer's recorded attention, its rows' original positions [B, R] and which rows were keys
    previous_layer: Callable[[], tuple[Captured, torch.Tensor, torch.Tensor]] | None = None
    causal: bool = True  # attention is causal (the LLM); the vision encoder's is not
    hidden: torch.Tensor | None = None  # [B, L', C] the current rows' hidden states (the `hidden` feature)
    cls: torch.Tensor | None = None  # [B, L] bool: the CLS token, where the stage has one
    patches: torch.Tensor | None = None  # [B, L] long: each position's patch index on the image grid, -1 elsewhere
    grid: tuple[int, int] | None = None  # the image patch grid (rows, columns)
    step: int = 0  # which layer of its (multi-layer) stage this is: schedules pick their amount by it
    steps: int = 1  # how many layers the stage has
    origin: torch.Tensor | None = None  # [B] long: image tokens alive before the stage's first layer (N0)

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
        if self.cls is not None:
            sets["cls"] = lambda: self.cls & alive  # type: ignore[operator]
        if name not in sets:
            raise PolicyError.at(f"token set '{name}' is not available in the runtime yet", None)
        return sets[name]()

    def apply(self, statement: ir.Statement, alive: torch.Tensor) -> torch.Tensor | None:
        """Run one let/score/protect/keep/drop statement; returns the tokens still alive ([B, L] bool), or
        None for a statement the caller handles (a merge, positions, ...)."""
        state = self.state
        match statement:
            case ir.Let(name=name, value=value):
                state.sets[name] = self.set(value)
            case ir.ScoreDef(name=name, value=value):
                state.scores[name] = self.score(value)
                state.formulas[name] = value
            case ir.Protect(target=target):
                state.protected = state.protected | self.set(target)
            case ir.Keep(target=target):
                return alive & (self.set(target) | state.protected | ~state.image)
            case ir.Drop(target=target):
                return alive & ~(self.set(target) & ~state.protected)
            case _:
                return None
        return alive

    # ---------------------------------------------------------------- sets
    def set(self, expr: ir.Expr) -> torch.Tensor:
        match expr:
            case ir.Name(id=name) if name in self.values:  # a parameter choosing a built-in set
                return self.set(self.values[name])
            case ir.Name(id=name):
                if name in self.state.sets:
                    return self.state.sets[name] & self.state.alive() & self.state.valid
                return self.builtin(name)
            case ir.Binary(op="|", left=left, right=right):
                return self.set(left) | self.set(right)
            case ir.Binary(op="&", left=left, right=right):
                return self.set(left) & self.set(right)
            case ir.Binary(op="-", left=left, right=right):
                return self.set(left) & ~self.set(right)
            case ir.Where(source=source, condition=condition):
                return self.set(source) & self.condition(condition)
            case ir.Select(selector=selector, source=source) if selector in SELECTOR_OPS:
                return SELECTOR_OPS[selector].select(expr, self.set(source), self)
            case ir.Call(fn=name) if isinstance(FUNCTION_OPS.get(name), SetFunction):
                return FUNCTION_OPS[name].members(expr, self)  # type: ignore[attr-defined]
            case ir.Index(base=base, index=index):
                return self.set(base) & self.one_image(index, expr)
        raise PolicyError.at("this set expression is not supported by the runtime yet", expr.span)

    def image_order(self, node: ir.Node) -> tuple[torch.Tensor, torch.Tensor]:
        """Each position's image in its prompt, [B, L] long (-1 for other tokens), and each row's prompt's image
        count, [B] long. In the LLM a row is a prompt: its images are its runs of placeholders
        (`ModelAdapter.image_index`)."""
        if self.state.images is None:
            raise PolicyError.at("this reads which image each token belongs to, which this prefill did not record "
                                 "(it came without input_ids)", node.span,
                                 "call the model or generate() with input_ids, not inputs_embeds")
        return self.state.images, self.state.images.amax(1) + 1

    def one_image(self, index: ir.Expr, node: ir.Index) -> torch.Tensor:
        """`vision[i]`: the tokens of image i of each prompt (negative i counts from the last), [B, L] bool.
        A prompt with images but no image i fails: `keep top k of vision[i]` would otherwise drop its others."""
        value = self.literal(index)
        if not (isinstance(value, ir.Number) and isinstance(value.value, int)):
            raise PolicyError.at("an image index is a whole number: vision[0] is each prompt's first image, "
                                 "vision[-1] its last", index.span)
        order, counts = self.image_order(node)
        wanted = torch.full_like(counts, value.value) + (counts if value.value < 0 else 0)
        missing = (counts > 0) & ((wanted < 0) | (wanted >= counts))
        if bool(missing.any()):
            row = int(missing.nonzero()[0])
            raise PolicyError.at(f"{print_expr(node)} is image {value.value} of each prompt, but prompt {row} of this "
                                 f"batch holds {int(counts[row])} image(s)", node.span,
                                 "index images that every prompt has (vision[-1] is each prompt's last)")
        return order == wanted[:, None]

    def counts(self, select: ir.Select, candidates: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
        """How many of each row's `candidates` ([B, L] bool) the selection keeps: [B] long, at most their number.
        A schedule operator (`geometric`, `mass`, ...) counts them itself (`score`: the selection's score [B, L],
        where its selector computed it); arithmetic on counts (`top round(T * alpha / 5)`, `top k - size(s)`) is
        computed per row, rounded, clamped to 0..size; other amounts by `count`."""
        value = self.literal(select.amount)
        sizes = candidates.sum(1)
        if isinstance(value, ir.Call) and value.fn in SCHEDULE_OPS:
            counts = SCHEDULE_OPS[value.fn].counts(value, select, candidates, self, score)
            return torch.minimum(counts.clamp(min=0), sizes)
        if isinstance(value, ir.Binary | ir.Unary) or (isinstance(value, ir.Call) and isinstance(
                FUNCTION_OPS.get(value.fn), AmountFunction)):
            wanted = self.amount(value, sizes.shape[0])
            return torch.minimum(wanted.round().long().clamp(min=0), sizes)
        return torch.tensor([self.count(select.amount, int(n), row) for row, n in enumerate(sizes.tolist())],
                            dtype=torch.long, device=sizes.device)

    def count(self, amount: ir.Expr, size: int, row: int = 0) -> int:
        """How many of `size` tokens `amount` selects in batch row `row`. A count is taken as is, a percentage
        of `size` is truncated; a list gives the amount of this layer of the stage, percentages in it relative
        to N0, the image tokens alive before the stage's first layer."""
        value = self.literal(amount)
        match value:
            case ir.ListExpr(items=items):  # one budget per layer of the stage (SparseVLM's [300, 200, 110])
                return min(size, self._budget(items[self.step], row))
            case ir.Percent(value=percent):
                return min(size, int(size * percent // 100) if isinstance(percent, int) else int(size * percent / 100))
            case ir.Number(value=number) if isinstance(number, int):
                return max(0, min(size, number))
        raise PolicyError.at("this amount is not supported by the runtime yet", amount.span)

    def amount(self, expr: ir.Expr, batch: int) -> torch.Tensor:
        """A count expression per row (an image before the LLM, a sample in it): [B] float64."""
        expr = self.literal(expr)
        device = self.state.image.device
        match expr:
            case ir.Number(value=value):
                return torch.full((batch,), float(value), dtype=torch.float64, device=device)
            case ir.Call(fn=name) if isinstance(FUNCTION_OPS.get(name), AmountFunction):
                return FUNCTION_OPS[name].amount(expr, self, batch)  # type: ignore[attr-defined]
            case ir.Unary(op="-", operand=operand):
                return -self.amount(operand, batch)
            case ir.Binary(op="+" | "-" | "*" | "/" as op, left=left, right=right):
                a, b = self.amount(left, batch), self.amount(right, batch)
                return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        raise PolicyError.at("this amount is not supported by the runtime yet", expr.span)

    def origin_of(self, row: int) -> int:
        """N0 of row `row`: its image tokens alive before the stage's first layer (schedules count from it)."""
        if self.origin is None:
            raise PolicyError.at("a schedule needs the image tokens before its stage, which are not known here", None)
        return int(self.origin[row])

    def _number(self, expr: ir.Expr) -> float:
        value = self.literal(expr)
        if not isinstance(value, ir.Number):
            raise PolicyError.at("a schedule needs a number here", expr.span)
        return float(value.value)

    def _budget(self, expr: ir.Expr, row: int) -> int:
        value = self.literal(expr)
        if isinstance(value, ir.Percent):
            origin = self.origin_of(row)
            return int(origin * value.value // 100) if isinstance(value.value, int) else int(origin * value.value / 100)
        return max(0, int(self._number(value)))

    # ---------------------------------------------------------------- features and geometry
    def features(self, expr: ir.Expr) -> torch.Tensor:
        """Per-token features of the current rows: [B, L', C]."""
        match expr:
            case ir.Name(id=name) if name in FEATURE_OPS:
                return FEATURE_OPS[name].compute(ir.Call(fn=name, span=expr.span), self)
            case ir.Call(fn=name) if name in FEATURE_OPS:
                return FEATURE_OPS[name].compute(expr, self)
        raise PolicyError.at("these features are not supported by the runtime yet", expr.span)

    def features_at(self, expr: ir.Expr) -> torch.Tensor:
        """Per-token features at the original positions: [B, L, C] (zeros where no row is)."""
        rows = self.features(expr)
        out = rows.new_zeros(*self.state.image.shape, rows.shape[-1])
        return out.scatter(1, self.state.kept[:, :, None].expand(-1, -1, rows.shape[-1]), rows)

    def patch_grid(self, what: str, node: ir.Node) -> tuple[torch.Tensor, tuple[int, int]]:
        """The patch index of each position [B, L] and the grid shape, for geometric operators."""
        if self.patches is None or self.grid is None:
            raise PolicyError.at(f"{what} needs the image patch grid, which this stage does not have", node.span)
        return self.patches, self.grid

    def grid_shape(self) -> tuple[int, int]:
        if self.grid is None:
            raise PolicyError.at("this operator needs the image patch grid", None)
        return self.grid

    def definition(self, expr: ir.Expr) -> ir.Expr:
        """`expr` with parameters and score names replaced by what defines them (`by relevance` -> the
        `attention(...)` call of `score relevance = ...`): for operators that read how a score is computed."""
        expr = self.literal(expr)
        while isinstance(expr, ir.Name) and expr.id in self.state.formulas:
            expr = self.literal(self.state.formulas[expr.id])
        return expr

    def literal(self, expr: ir.Expr) -> ir.Expr:
        if isinstance(expr, ir.Name) and expr.id in self.values:
            return self.values[expr.id]
        return expr

    # ---------------------------------------------------------------- scores
    def score(self, expr: ir.Expr) -> torch.Tensor:
        """A score [B, L] over original positions; NaN at an alive image token raises (runtime guard)."""
        values = self._score(expr)
        check_scores(values, self.state.image & self.state.alive() & self.state.valid,
                     f"the score at {'LLM' if self.causal else 'encoder'} layer {self.seed_offset}", expr.span)
        return values

    def _score(self, expr: ir.Expr) -> torch.Tensor:
        expr = self.literal(expr)
        match expr:
            case ir.Number(value=value):
                return torch.full(self.state.image.shape, float(value), device=self.state.image.device)
            case ir.Name(id=name) if name in self.state.scores:
                return self.state.scores[name]
            case ir.Name(id=name) if name in SIGNAL_OPS:
                return SIGNAL_OPS[name].compute(ir.Call(fn=name, span=expr.span), self)
            case ir.Call(fn=name) if name in SIGNAL_OPS:
                return SIGNAL_OPS[name].compute(expr, self)
            case ir.Call(fn=name) if isinstance(FUNCTION_OPS.get(name), ScoreFunction):
                return FUNCTION_OPS[name].score(expr, self)  # type: ignore[attr-defined]
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
