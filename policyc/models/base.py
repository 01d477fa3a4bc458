"""What the compiler needs to know about one model instance, and the registry of adapter factories.

An adapter is found by structure (module classes, `nn.ModuleList`s, config fields), never by one
transformers version's attribute paths, so the same code runs on transformers 5.17 and 5.24.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from policyc.errors import Diagnostic, PolicyError, Span
from policyc.models.layout import ImageLayout, fixed_size_layouts

if TYPE_CHECKING:
    from policyc.runtime.row_folds import RowFold


class ImageTokensHook(Protocol):
    """Per image (or video): its LLM tokens [n_i, D] and which are image features [n_i] bool -> the tokens the LLM
    receives. `token_id`: the placeholder id they sit on. Videos also give `frames` and `spots`: each token's frame
    and spatial index within it, [n_i] long each, -1 on separators (`merge temporal`)."""

    def __call__(self, tokens: list[torch.Tensor], image: list[torch.Tensor], token_id: int,
                 frames: list[torch.Tensor] | None = None,
                 spots: list[torch.Tensor] | None = None) -> list[torch.Tensor]: ...


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
    patch_grid: tuple[int, int] | None  # patches per side (rows, columns); None: each image has its own (Qwen2-VL)
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
    tokens_per_image: int | None  # image tokens the LLM sees per image; None: set by each image's size
    rope: str = "1d"  # the LLM's position encoding: "1d" RoPE, or "mrope" (Qwen2-VL's 3-D time/height/width)
    vision_token_ids: tuple[int, ...] = ()  # every placeholder id of visual tokens (images, video); () = image's
    encoder_patches_per_token: int = 1  # encoder patches behind one LLM image token (Qwen2-VL's 2x2 merger: 4)
    # Why stages before the LLM (encoder, projector) cannot bind to this model yet; None: they can.
    pre_llm_unsupported: str | None = None
    encoder_unsupported: str | None = None  # why encoder stages alone cannot bind yet (projector stages can)
    projector_unsupported: str | None = None  # why projector stages alone cannot bind yet (encoder stages can)
    # The connector needs every patch (pixel shuffle, pooling): encoder merges are undone at the tower's output
    # (each patch takes its merged token's value; the encoder saves compute only) and encoder drops are refused.
    encoder_unmerges: bool = False
    encoder_packed: bool = False  # the tower packs every image into one sequence (Qwen2-VL): runtime/qwen_tower.py
    encoder_grid: tuple[int, int] | None = None  # one encoder input's patch grid where `patch_grid` is None (crops)
    reads_video_frames: bool = False  # projector stages know each video token's frame (`merge temporal`)
    # The attention type of each decoder layer where they differ (Gemma 3: "sliding_attention", "full_attention"):
    # each type has its own mask and rotary embedding. (): every layer attends alike (causal, one rotary).
    layer_types: tuple[str, ...] = ()
    # DeepStack (Qwen3-VL): mergers after some encoder blocks whose features the LLM adds again to the visual
    # positions of decoder layer k's output, level k after layer k. (): the LLM takes vision features once.
    deepstack_mergers: tuple[nn.Module, ...] = field(default=(), repr=False)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image in the encoder (CLS not counted); 0 where images set their own grid."""
        return self.patch_grid[0] * self.patch_grid[1] if self.patch_grid is not None else 0

    @property
    def vision_tokens(self) -> int:
        """Tokens per image inside the encoder: the patches, plus CLS when the tower has one."""
        return self.num_patches + int(self.has_cls)

    @property
    def deepstack_layers(self) -> int:
        """The decoder layers whose outputs receive DeepStack features: 0 .. deepstack_layers - 1 (0: none)."""
        return len(self.deepstack_mergers)

    def layer_type(self, index: int) -> str | None:
        """The attention type of decoder layer `index` (the key of its mask in the decoder's mask mapping), or
        None where every layer attends alike."""
        return self.layer_types[index] if self.layer_types else None

    def position_embeddings(self, index: int, hidden: torch.Tensor,
                            position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) of decoder layer `index` at `position_ids` [B, n], for `hidden` [B, n, D]."""
        if self.rotary is None:
            raise PolicyError.at("renumbering positions needs the LLM's rotary embedding, which was not found", None)
        return self.rotary(hidden, position_ids=position_ids)

    @property
    def video_token_id(self) -> int | None:
        """The video placeholder id, where the family has videos (after the image id in `vision_token_ids`)."""
        return self.vision_token_ids[1] if len(self.vision_token_ids) > 1 else None

    @property
    def visual_ids(self) -> tuple[int, ...]:
        """The input_ids that mark visual tokens (what the `vision` set holds in the LLM)."""
        return self.vision_token_ids or (self.image_token_id,)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the positions of visual tokens in `input_ids` [B, L]."""
        ids = torch.tensor(self.visual_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)

    def image_sizes(self, input_ids: torch.Tensor) -> list[int]:
        """The LLM tokens of each image (not video) in one prompt row `input_ids` [L], in order (`image_index`)."""
        index = self.image_index(input_ids[None])[0]
        return torch.unique_consecutive(index[input_ids == self.image_token_id], return_counts=True)[1].tolist()

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] long: which image of its prompt (0, 1, ... in order) each visual token of `input_ids` [B, L]
        belongs to, -1 for other tokens (`vision[i]`, the `image` signal). An image is a run of one placeholder
        id (Qwen2-VL: an image or a video), split into images of `tokens_per_image` where that is fixed (adjacent
        images; Idefics3's and InternVL's tiles are images of their own, as before the LLM)."""
        visual = self.visual_mask(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        before = torch.nn.functional.pad(input_ids, (1, 0), value=-1)[:, :-1]
        before_visual = torch.nn.functional.pad(visual, (1, 0), value=False)[:, :-1]
        starts = visual & (~before_visual | (before != input_ids))
        if self.tokens_per_image is not None:
            run_start = torch.where(starts, positions, 0).cummax(1).values
            starts = starts | (visual & ((positions - run_start) % self.tokens_per_image == 0))
        return torch.where(visual, starts.long().cumsum(1) - 1, -1)

    def encoder_tokens(self, llm_tokens: int) -> int:
        """Encoder tokens behind an image the LLM sees as `llm_tokens` tokens."""
        if self.tokens_per_image is not None:
            return self.vision_tokens
        return llm_tokens * self.encoder_patches_per_token + int(self.has_cls)

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """The grid an image's LLM tokens tile, where one grid holds for every image and a token is one encoder
        patch (LLaVA); None where tokens fold patches (pixel shuffle, pooling, mergers) or images differ."""
        return self.patch_grid if self.encoder_patches_per_token == 1 else None

    @property
    def draws_tokens(self) -> bool:
        """Whether `image_layouts` can place every image's LLM tokens on the pictures the encoder saw
        (`--show-tokens`): one token per patch (LLaVA), or a family that knows its own layout (Qwen2-VL's merged
        rasters, Gemma 3's pooled grids, LLaVA-NeXT's base views and crops, the tiles of Idefics3 and InternVL)."""
        one_per_patch = self.patch_grid is not None and self.encoder_patches_per_token == 1 and \
            int(self.has_cls) >= self.feature_start  # (without CLS, "default" drops the first patch)
        return one_per_patch or type(self).image_layouts is not ModelAdapter.image_layouts

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of prompt row `row` of processed `inputs`, as the pictures the encoder saw with the grid of
        LLM tokens over each (`policyc.models.layout`), for `--show-tokens` pictures. Here: one token per patch,
        each image's tokens past a CLS token the features keep."""
        if self.patch_grid is None or self.encoder_patches_per_token != 1:
            raise NotImplementedError(f"{type(self).__name__} must lay out its own images")
        return fixed_size_layouts(self, inputs, row, self.patch_grid, int(self.has_cls) - self.feature_start)

    def projector_input_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The encoder features behind each LLM token of an image, from the projector's input [I, P, E]: [I, N, E]
        (MMTok's image coverage). One patch per token here; families whose projector pools patches override it."""
        return features

    def hook_image_tokens(self, on_tokens: ImageTokensHook) -> Callable[[], None] | None:
        """Families whose LLM tokens of an image are assembled after the projector (anyres unpadding, newlines)
        call `on_tokens` with each image's tokens as the LLM receives them and which of them are image features
        (not separators), and hand the LLM what it returns; a family with videos does the same per video (with its
        tokens' frames). The result undoes the hook. None: projector stages run on the projector's output."""
        return None

    def track_video_forwards(self, on_video: Callable[[bool], None]) -> Callable[[], None] | None:
        """Families that encode a prompt's images and videos in two forwards of one packed tower (Qwen2-VL) call
        `on_video(True)` before each video forward and `on_video(False)` after it, so that the tower's hook knows
        which placeholders its tokens fill. The result undoes the hook. None: the family has no such forwards."""
        return None

    def hook_llm_rows(self, rows: Callable[[], torch.Tensor | None],
                      folds: Callable[[], Sequence[RowFold]] | None = None) -> Callable[[], None] | None:
        """Families that add features to the LLM's hidden states by prompt position between decoder layers
        (Qwen3-VL's DeepStack) read the prompt rows still alive from `rows()` ([B, L'] positions; None outside a
        prefill), so that a dropped token's features go with it, and the prefill's LLM merges so far from
        `folds()` (runtime/row_folds.py), so that a merged token's features fold as its rows did. The result
        undoes the hook. None: nothing to do."""
        return None

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """A model-agnostic calibration prompt: `text_tokens` text ids around one image's tokens, and the
        example image at the encoder's size scaled to [-1, 1] (no processor needed). Families with their
        own inputs (grids, token types) override this."""
        config = self.model.config
        if self.tokens_per_image is None or self.patch_grid is None:
            raise NotImplementedError(f"{type(self).__name__} must build its own sample inputs")
        row = text_around(self, text_tokens, [self.image_token_id] * self.tokens_per_image)
        image_size = config.vision_config.image_size
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        pixels = example_pixels(size)[None]
        device, dtype = placement(self.model)
        return {"input_ids": torch.tensor([row], device=device),
                "attention_mask": torch.ones(1, len(row), dtype=torch.long, device=device),
                "pixel_values": pixels.to(device=device, dtype=dtype)}

    @property
    def feature_encoder_layer(self) -> int:
        """The encoder layer whose output LLaVA hands to the projector (-1: the embeddings)."""
        return self.feature_layer - 1

    def signals(self) -> frozenset[str]:
        """The signal capabilities this model offers; `cls_attention` and `cls_token` only with a CLS token, the
        encoder's only where stages before the LLM can bind."""
        if self.pre_llm_unsupported is not None or self.encoder_unsupported is not None:
            return LLM_SIGNALS
        return ENCODER_SIGNALS | LLM_SIGNALS | (CLS_SIGNALS if self.has_cls else frozenset())

    def check(self, requirements: Iterable[Requirement],
              stages: Iterable[tuple[str, str, Span | None]] = ()) -> None:
        """Raise one `PolicyError` listing every requirement this model cannot meet, at the policy's spans, and
        every (label, kind, span) stage it cannot run (stages before the LLM where `pre_llm_unsupported` says why)."""
        problems = [d for label, kind, span in stages if (d := self._stage_problem(label, kind, span)) is not None]
        problems += [d for r in requirements if (d := self._problem(r)) is not None]
        if problems:
            raise PolicyError(problems)

    def _stage_problem(self, label: str, kind: str, span: Span | None) -> Diagnostic | None:
        reason = self.pre_llm_unsupported if kind in ("encoder", "projector") else None
        if kind == "encoder" and reason is None and self.encoder_unsupported is not None:
            return Diagnostic(f"{label} is an encoder stage: {self.encoder_unsupported}", span,
                              "projector.output stages (e.g. divprune, random_drop), LLM stages and decode cache "
                              "policies run on this model")
        if kind == "projector" and reason is None and self.projector_unsupported is not None:
            return Diagnostic(f"{label} is a projector stage: {self.projector_unsupported}", span,
                              "encoder merges (e.g. tome), LLM stages and decode cache policies run on this model, "
                              "e.g. fastv, pyramiddrop, sparsevlm, h2o, snapkv")
        if reason is None:
            return None
        return Diagnostic(f"{label} is a{'n' if kind == 'encoder' else ''} {kind} stage: {reason}",
                          span, "LLM stages (llm.layer[...]) and decode cache policies run on this model, e.g. "
                                "fastv, pyramiddrop, sparsevlm, h2o, snapkv")

    def _problem(self, requirement: Requirement) -> Diagnostic | None:
        what, value, span, reason = requirement.what, requirement.value, requirement.span, requirement.reason
        tower = type(self.vision_tower).__name__
        if what == "cls_token" and not self.has_cls:
            substitute = ("attention(last -> vision) in an LLM stage (FastV's signal), or visiondrop_llm "
                          "(VisionZip-style)") \
                if self.pre_llm_unsupported or self.encoder_unsupported or self.encoder_unmerges \
                else "attention(last -> vision) in the LLM, or attention(all -> vision) or key_norm in the encoder"
            return Diagnostic(f"{reason}, but this model's vision tower ({tower}) has no CLS token", span,
                              f"towers without CLS (SigLIP, Qwen2-VL) need a score that does not read `cls`, e.g. "
                              f"{substitute}")
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
        grid = "patches per image set by its size" if self.patch_grid is None else \
            f"{self.patch_grid[0]}x{self.patch_grid[1]} patches"
        per_image = "a size-dependent number of" if self.tokens_per_image is None else str(self.tokens_per_image)
        rotary = type(self.rotary).__name__ if self.rotary is not None else "none"
        strategy = "full" if self.feature_start == 0 else "default"
        return "\n".join([
            f"model: {type(self.model).__name__} (family {self.family})",
            f"encoder: {type(self.vision_tower).__name__}, {len(self.vision_layers)} layers, "
            f"{self.vision_num_heads} heads x {self.vision_head_dim}, {grid}{cls}",
            f"features: encoder layer {self.feature_encoder_layer} (hidden_states[{self.feature_layer}]), "
            f"strategy {strategy}, {per_image} image tokens per image",
            f"projector: {type(self.projector).__name__}",
            f"llm: {type(self.decoder).__name__}, {len(self.decoder_layers)} layers, {self.num_heads} heads "
            f"({self.num_kv_heads} kv) x {self.head_dim}, hidden {self.hidden_size}, rotary {rotary} ({self.rope})",
            f"visual token ids: {', '.join(map(str, self.visual_ids))}",
            f"signals: {', '.join(sorted(self.signals()))}",
        ])


def text_around(adapter: ModelAdapter, count: int, middle: list[int]) -> list[int]:
    """`count` ordinary text ids (no special or visual id) with `middle` in their middle."""
    config = adapter.model.config
    text_config = getattr(config, "text_config", config)
    special = {*adapter.visual_ids}  # every *_token_id the configs set (read from vars: some are deprecated)
    special |= {v for c in (config, text_config) for k, v in vars(c).items() if k.endswith("_token_id")
                and isinstance(v, int)}
    ids = [i for i in range(3, text_config.vocab_size) if i not in special][:count]
    half = len(ids) // 2
    return ids[:half] + middle + ids[half:]


def example_pixels(size: tuple[int, int]) -> torch.Tensor:
    """The example image resized to `size` (height, width), [3, H, W] float in [-1, 1]."""
    from PIL import Image

    from policyc.models.bundled import example_image_path

    picture = Image.open(example_image_path()).convert("RGB").resize((size[1], size[0]))
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(size[0], size[1], 3).float()
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


class AdapterFactory(ABC):
    """Builds `ModelAdapter`s for one model family; register subclasses with `@register_adapter`."""

    family: ClassVar[str]
    description: ClassVar[str]  # one line for "supported models" hints
    model_types: ClassVar[frozenset[str]] = frozenset()  # the configs' model_type values this factory adapts

    def matches(self, model: nn.Module) -> bool:
        """Whether this factory can adapt `model`: by default, its config's model_type is one of `model_types`."""
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

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


__all__ = ["AdapterFactory", "ModelAdapter", "Requirement", "example_pixels", "factories", "placement",
           "register_adapter", "supported_families", "text_around"]
