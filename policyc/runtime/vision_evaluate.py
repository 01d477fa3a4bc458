"""What stages before the LLM evaluate beyond the shared `StageEvaluator`: the set function `dilate(set)`;
amounts computed from counts, `size(set)` and `round`/`floor`/`ceil` (HiPrune's `top round(T * alpha / 5)`
and `top T - size(buffers)`), evaluated per image; attention read at earlier encoder layers
(`attention(..., layer=k)`, `layers=a..b`: VTC-CLS); and FlowCut's pieces: `normalize`, `ema` across the
layers of a stage, the attention values (`value_norm`, `attention(space=values)`) and the `entropy` schedule;
and, at projector.output, the projector's input and the question's words (MMTok's `cover`, `text_relevance`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.lang.printer import print_expr
from policyc.passes.base import number_value, option_value
from policyc.passes.dilate import dilate
from policyc.runtime.evaluate import Captured, StageEvaluator


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
    space = next((k for k in call.kwargs if k.name == "space"), None)
    if option is not None and space is not None and isinstance(space.value, ir.Name) and space.value.id == "values":
        raise PolicyError.at("attention(space=values) reads the stage's own layer", option.span,
                             "leave out layer= and layers=")
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




def reads_values(statements: tuple[ir.Statement, ...]) -> bool:
    """Whether `statements` read the attention values (operators with `reads_values`: value_norm, values, ...;
    attention(space=values))."""
    from policyc.passes import FEATURE_OPS, SIGNAL_OPS

    readers = {name for name, op in {**SIGNAL_OPS, **FEATURE_OPS}.items() if op.reads_values}
    for statement in statements:
        for node in statement.walk():
            if isinstance(node, ir.Name) and node.id in readers:
                return True
            if isinstance(node, ir.Call) and (node.fn in readers or (node.fn == "attention" and any(
                    k.name == "space" and isinstance(k.value, ir.Name) and k.value.id == "values"
                    for k in node.kwargs))):
                return True
    return False


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
    attention_values: torch.Tensor | None = None  # [B, H, L', d] this layer's attention values, where read
    memory: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # ema() across the stage's layers
    layer_count: int = 0  # encoder layers
    layer: int = 0  # the encoder layer the stage runs at
    stage_layers: tuple[int, ...] = ()  # every layer of the stage
    label: str = ""  # the stage, for ema()'s memory
    encoder_features: torch.Tensor | None = None  # [B, L, E] what the projector read (projector.output only)
    encoder_input: torch.Tensor | None = None  # [B, L, C] the first encoder layer's input (encoder stages only)
    question: Callable[[], list[torch.Tensor]] | None = None  # per image: its prompt words' embeddings [m, D]
    samples: Callable[[], torch.Tensor] | None = None  # [B] long: the prompt row of each image (allocate=)
    frames: torch.Tensor | None = None  # [B, L] long: each position's frame (group) in its video, -1 for none
    spots: torch.Tensor | None = None  # [B, L] long: each position's spatial index within its frame, -1 for none
    # An entropy() amount needs the selection's candidates and score, which `counts` is not given: `set` counts
    # it when it meets the selection and hands the counts to the selector's `counts` call for that amount.
    _scheduled: tuple[ir.Expr, torch.Tensor] | None = None

    def projector_input(self, node: ir.Node) -> torch.Tensor:
        """The encoder features the projector received, at the original positions: [B, L, E] (MMTok's xc)."""
        if self.encoder_features is None:
            raise PolicyError.at("this reads the projector's input, which only projector.output stages have", node.span)
        return self.encoder_features

    def tower_input(self, node: ir.Node) -> torch.Tensor:
        """The first encoder layer's input at the original positions: [B, L, C] (GTP-ViT's graph)."""
        if self.encoder_input is None:
            raise PolicyError.at("this reads the vision encoder's input, which only encoder layer stages have",
                                 node.span)
        return self.encoder_input

    def question_words(self, node: ir.Node) -> list[torch.Tensor]:
        """Each image's question words, the LLM input embeddings of its prompt's text after it: [m_b, D] each."""
        if self.question is None:
            raise PolicyError.at("this reads the question, which only projector.output stages have before the LLM",
                                 node.span)
        return self.question()

    def image_samples(self, node: ir.Node) -> torch.Tensor:
        """Which sample (prompt row) each image of the stage belongs to: [B] long (`top(allocate=...)`)."""
        if self.samples is None:
            raise PolicyError.at("this reads which prompt each image belongs to, which only projector.output stages "
                                 "know before the LLM", node.span, "select from one image at projector.output or "
                                 "in the LLM")
        return self.samples()

    def image_order(self, node: ir.Node) -> tuple[torch.Tensor, torch.Tensor]:
        """Before the LLM a row is one image: its place among its prompt's images at every image token ([B, L]
        long, -1 elsewhere) and its prompt's image count ([B] long)."""
        samples = self.image_samples(node).to(self.state.image.device)
        rows = torch.arange(len(samples), device=samples.device)
        first = torch.full_like(samples, len(samples)).scatter_reduce(0, samples, rows, "amin")
        counts = torch.zeros_like(samples).scatter_add(0, samples, torch.ones_like(samples))
        return torch.where(self.state.image, (rows - first[samples])[:, None], -1), counts[samples]

    def recorded_values(self, what: str) -> torch.Tensor:
        if self.attention_values is None:
            raise PolicyError.at(f"{what} needs this layer's attention values, which were not recorded", None)
        return self.attention_values

    # ---------------------------------------------------------------- scores: normalize, ema
    def score(self, expr: ir.Expr) -> torch.Tensor:
        """normalize(x, by=sum|max|minmax) rescales over the image tokens alive (FlowCut divides by the sum over
        the patches); ema(x, decay) is x at the stage's first layer, then decay * previous + (1 - decay) * x."""
        expr = self.literal(expr)
        if isinstance(expr, ir.Call) and expr.fn == "normalize":
            x = self.score(expr.args[0])
            by = self._word(expr, "by", "sum")
            vision = self.builtin("vision")
            inside = x.masked_fill(~vision, float("nan"))
            if by == "sum":
                return x / torch.nansum(inside, 1, keepdim=True)
            top = inside.nan_to_num(float("-inf")).amax(1, keepdim=True)
            if by == "max":
                return x / top
            low = inside.nan_to_num(float("inf")).amin(1, keepdim=True)
            return (x - low) / (top - low)
        if isinstance(expr, ir.Call) and expr.fn == "ema":
            x = self.score(expr.args[0])
            decay = float(self._number(expr, "decay", 0.5))
            key = (self.label, id(expr))
            previous = self.memory.get(key)
            value = x if previous is None or self.layer == self.stage_layers[0] else decay * previous + (1 - decay) * x
            self.memory[key] = value
            return value
        return super().score(expr)

    def _option(self, call: ir.Call, name: str) -> ir.Expr | None:
        return option_value(call.kwargs, name, self.literal)

    def _word(self, call: ir.Call, name: str, default: str) -> str:
        value = self._option(call, name)
        return value.id if isinstance(value, ir.Name) else default

    def _number(self, call: ir.Call, name: str, default: float) -> float:
        return number_value(self._option(call, name), default, f"{call.fn}({name}=...)", call.span)

    def signal_layers(self, call: ir.Call) -> list[int]:
        return signal_layers(call, self.values, self.layer_count, self.layer) or [self.layer]

    def set(self, expr: ir.Expr) -> torch.Tensor:
        if isinstance(expr, ir.Select) and isinstance(amount := self.literal(expr.amount), ir.Call) \
                and amount.fn == "entropy":
            self._scheduled = (expr.amount, self._entropy_counts(amount, expr, self.set(expr.source)))
        if isinstance(expr, ir.Call) and expr.fn == "dilate":
            patches, grid = self.patch_grid("dilate()", expr)
            radius = self._number(expr, "radius", 1)
            return dilate(self.set(expr.args[0]), patches, grid, int(radius)) & self.builtin("vision")
        return super().set(expr)

    def counts(self, amount: ir.Expr, sizes: torch.Tensor) -> torch.Tensor:
        if self._scheduled is not None and self._scheduled[0] is amount:
            counts, self._scheduled = self._scheduled[1], None
            return torch.minimum(counts, sizes)
        return super().counts(amount, sizes)

    def _entropy_counts(self, call: ir.Call, select: ir.Select, candidates: torch.Tensor) -> torch.Tensor:
        """FlowCut's adaptive budget, per image: on the stage's last layer and every `every`-th one before it
        (r layers left after this one), N candidates keep max(N - round((N - target) / sqrt(r) *
        (1 - (H / log N)^2)), target), H the entropy of the score normalised over the candidates; on the last
        layer, `target`; elsewhere all N (and all N when N <= target)."""
        target = self._option(call, "target") if call.args == () else self.literal(call.args[0])
        if not (isinstance(target, ir.Number) and isinstance(target.value, int)):
            raise PolicyError.at("entropy(target) takes a whole number", call.span)
        every = int(self._number(call, "every", 1))
        layers = self.stage_layers
        left = len(layers) - 1 - layers.index(self.layer)
        sizes = candidates.sum(1)
        if left % every:
            return sizes
        if left == 0:
            return torch.minimum(sizes, torch.full_like(sizes, target.value))
        by = self._option(call, "score") or select.by
        if by is None:
            raise PolicyError.at("entropy() needs a score: the selection's `by` or score=...", call.span)
        score = self.score(by).float().masked_fill(~candidates, 0)
        p = score / score.sum(1, keepdim=True)
        entropy = -torch.where(candidates, p * torch.log(p), torch.zeros_like(p)).sum(1)
        ratio = entropy / torch.log(sizes.float())
        spread = torch.tensor([(n - target.value) / left ** 0.5 for n in sizes.tolist()], device=sizes.device)
        pruned = torch.round(spread.float() * (1 - ratio ** 2)).long()  # in float32, as FlowCut's code
        keep = torch.clamp(sizes - pruned, min=target.value)
        return torch.where(sizes > target.value, keep, sizes)


__all__ = ["VisionEvaluator"]
