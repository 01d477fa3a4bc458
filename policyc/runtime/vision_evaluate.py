"""What stages before the LLM give their operators beyond the shared `StageEvaluator`: attention read at earlier
encoder layers (`attention(..., layer=k)`, `layers=a..b`: VTC-CLS); the attention values (`value_norm`,
`attention(space=values)`); a memory across the layers of a stage (`ema`) and the stage's layers (`entropy`); the
encoder's input (GTP-ViT); and, at projector.output, the projector's input, the question's words (MMTok's
`cover`, `text_relevance`) and each image's prompt (`top(allocate=...)`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.lang.printer import print_expr
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

    def carried(self, call: ir.Call) -> torch.Tensor | None:
        """The value `call` (e.g. `ema(...)`) had at the stage's previous layer; None at the stage's first layer."""
        if self.layer == self.stage_layers[0]:
            return None
        return self.memory.get((self.label, id(call)))

    def carry(self, call: ir.Call, value: torch.Tensor) -> None:
        """Keep `call`'s value for the stage's next layer (`carried`)."""
        self.memory[(self.label, id(call))] = value

    def signal_layers(self, call: ir.Call) -> list[int]:
        return signal_layers(call, self.values, self.layer_count, self.layer) or [self.layer]


__all__ = ["VisionEvaluator"]
