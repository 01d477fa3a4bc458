"""What the compiler needs to know about one model instance, and the registry of adapter factories.

An adapter is found by structure (module classes, `nn.ModuleList`s, config fields), never by one
transformers version's attribute paths, so the same code runs on transformers 5.17 and 5.24.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

from torch import nn

from policyc.errors import Diagnostic, PolicyError, Span

# Signal capabilities a model may offer (see `ModelAdapter.signals`).
ENCODER_SIGNALS = frozenset({"encoder_attention", "encoder_keys", "encoder_values", "encoder_hidden"})
LLM_SIGNALS = frozenset({"llm_attention", "llm_keys", "llm_values", "llm_hidden"})
CLS_SIGNALS = frozenset({"cls_attention", "cls_token"})


class Requirement(Protocol):
    """What a checked policy needs from the model (`policyc.lang.check.Requirement` has this shape)."""

    @property
    def what(self) -> str: ...  # "cls_token" | "encoder_layer" | "llm_layer"
    @property
    def value(self) -> int | None: ...
    @property
    def span(self) -> Span | None: ...
    @property
    def reason(self) -> str: ...


@dataclass(frozen=True, eq=False)
class ModelAdapter:
    """Hook points and shapes of one model instance (compared and hashed by identity)."""

    family: str  # the registered factory's family, e.g. "llava"
    model: nn.Module = field(repr=False)  # the top-level model (e.g. LlavaForConditionalGeneration)
    vision_tower: nn.Module = field(repr=False)  # the vision encoder model (CLIPVisionModel, SiglipVisionModel)
    vision_layers: nn.ModuleList = field(repr=False)  # the encoder layers, in order
    vision_attention: tuple[nn.Module, ...] = field(repr=False)  # the self-attention module of each encoder layer
    has_cls: bool  # the encoder prepends a CLS token to the patches (CLIP yes, SigLIP no)
    feature_layer: int  # index into the encoder's hidden_states: 0 = embeddings, i + 1 = output of layer i
    feature_start: int  # first encoder token the projector sees: 1 ("default" strategy drops token 0), 0 ("full")
    keeps_cls_in_features: bool  # the CLS token reaches the projector (strategy "full" on a tower with CLS)
    patch_grid: tuple[int, int]  # patches per side (rows, columns) at the configured image size
    projector: nn.Module = field(repr=False)  # maps encoder features into the LLM embedding space
    decoder: nn.Module = field(repr=False)  # the language model body (what `model.get_decoder()` returns)
    decoder_layers: nn.ModuleList = field(repr=False)  # the LLM decoder layers, in order
    decoder_attention: tuple[nn.Module, ...] = field(repr=False)  # the self-attention module of each decoder layer
    rotary: nn.Module | None = field(repr=False)  # the LLM's shared rotary embedding, if it has one
    num_heads: int  # LLM query heads
    num_kv_heads: int  # LLM key/value heads (fewer than num_heads under GQA)
    head_dim: int  # LLM per-head dimension
    hidden_size: int  # LLM hidden size
    vision_num_heads: int  # encoder attention heads
    vision_head_dim: int  # encoder per-head dimension
    image_token_id: int  # the placeholder id that marks image positions in input_ids
    tokens_per_image: int  # image tokens the LLM sees per image at the configured image size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image in the encoder (CLS not counted)."""
        return self.patch_grid[0] * self.patch_grid[1]

    @property
    def vision_tokens(self) -> int:
        """Tokens per image inside the encoder: the patches, plus CLS when the tower has one."""
        return self.num_patches + int(self.has_cls)

    @property
    def feature_encoder_layer(self) -> int:
        """The encoder layer whose output LLaVA hands to the projector (-1: the embeddings)."""
        return self.feature_layer - 1

    def signals(self) -> frozenset[str]:
        """The signal capabilities this model offers; `cls_attention` and `cls_token` only with a CLS token."""
        return ENCODER_SIGNALS | LLM_SIGNALS | (CLS_SIGNALS if self.has_cls else frozenset())

    def check(self, requirements: Iterable[Requirement]) -> None:
        """Raise one `PolicyError` listing every requirement this model cannot meet, at the policy's spans."""
        problems = [d for r in requirements if (d := self._problem(r)) is not None]
        if problems:
            raise PolicyError(problems)

    def _problem(self, requirement: Requirement) -> Diagnostic | None:
        what, value, span, reason = requirement.what, requirement.value, requirement.span, requirement.reason
        tower = type(self.vision_tower).__name__
        if what == "cls_token" and not self.has_cls:
            return Diagnostic(f"{reason}, but this model's vision tower ({tower}) has no CLS token", span,
                              "towers without CLS (SigLIP) need a score that does not read `cls`, "
                              "e.g. attention(last -> vision) in the LLM or key_norm")
        if what == "encoder_layer" and value is not None:
            count = len(self.vision_layers)
            if not -count <= value < count:
                return Diagnostic(f"encoder layer {value} does not exist ({reason}): the vision encoder has "
                                  f"{count} layers", span, f"valid layers: 0..{count - 1} or -{count}..-1")
        if what == "llm_layer" and value is not None:
            count = len(self.decoder_layers)
            if not -count <= value < count:
                return Diagnostic(f"LLM layer {value} does not exist ({reason}): the language model has "
                                  f"{count} layers", span, f"valid layers: 0..{count - 1} or -{count}..-1")
        return None

    def describe(self) -> str:
        """A few lines for `policyc compile --emit plan`."""
        cls = " + CLS" if self.has_cls else " (no CLS)"
        rows, cols = self.patch_grid
        rotary = type(self.rotary).__name__ if self.rotary is not None else "none"
        strategy = "full" if self.feature_start == 0 else "default"
        return "\n".join([
            f"model: {type(self.model).__name__} (family {self.family})",
            f"encoder: {type(self.vision_tower).__name__}, {len(self.vision_layers)} layers, "
            f"{self.vision_num_heads} heads x {self.vision_head_dim}, {rows}x{cols} patches{cls}",
            f"features: encoder layer {self.feature_encoder_layer} (hidden_states[{self.feature_layer}]), "
            f"strategy {strategy}, {self.tokens_per_image} image tokens per image",
            f"projector: {type(self.projector).__name__}",
            f"llm: {type(self.decoder).__name__}, {len(self.decoder_layers)} layers, {self.num_heads} heads "
            f"({self.num_kv_heads} kv) x {self.head_dim}, hidden {self.hidden_size}, rotary {rotary}",
            f"image token id: {self.image_token_id}",
            f"signals: {', '.join(sorted(self.signals()))}",
        ])


class AdapterFactory(ABC):
    """Builds `ModelAdapter`s for one model family; register subclasses with `@register_adapter`."""

    family: ClassVar[str]
    description: ClassVar[str]  # one line for "supported models" hints

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this factory can adapt `model`."""

    @abstractmethod
    def build(self, model: nn.Module) -> ModelAdapter:
        """The adapter for `model` (raises `PolicyError` when its structure is not as expected)."""


_FACTORIES: list[AdapterFactory] = []
F = TypeVar("F", bound=type[AdapterFactory])


def register_adapter(cls: F) -> F:
    """Class decorator: register an `AdapterFactory` subclass (one per family)."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterFactory)):
        raise TypeError(f"register_adapter expects an AdapterFactory subclass, got {cls!r}")
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        raise TypeError(f"{cls.__name__} must set a non-empty `family`")
    if any(f.family == family for f in _FACTORIES):
        raise ValueError(f"an adapter for family '{family}' is already registered")
    _FACTORIES.append(cls())
    return cls


def factories() -> tuple[AdapterFactory, ...]:
    """The registered factories, in registration order."""
    return tuple(_FACTORIES)


def supported_families() -> str:
    """A hint listing the supported model families."""
    return "supported models: " + "; ".join(f"{f.family} ({f.description})" for f in _FACTORIES)


__all__ = ["AdapterFactory", "ModelAdapter", "Requirement", "factories", "register_adapter", "supported_families"]
