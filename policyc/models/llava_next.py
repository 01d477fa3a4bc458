"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, LLaVA-1.6): LLaVA with "anyres" images.

What differs from LLaVA-1.5:
- anyres: each image is encoded as a base view at the tower's input size plus crops of the image resized to
  the grid pinpoint that fits it best (`image_grid_pinpoints`); the crops' features are unpadded back to the
  image's aspect ratio and every row of them ends with the learned `image_newline` feature. The LLM sees, per
  image, the base view's features, then the unpadded rows with their newlines: how many follows from the
  image's size (`image_sizes`), so `tokens_per_image` and `patch_grid` are None.
- every one of these features (base, crops, newlines) sits on an `<image>` placeholder (one id): the `vision`
  set holds them all, newline tokens included.
- the LLM (Llama, Mistral, Vicuna) uses 1-D RoPE and a causal mask, as LLaVA's: LLM stages and decode cache
  policies run as they do on LLaVA-1.5.

Encoder merges (ToMe) run per encoder input (the base view and every crop, each on the tower's own patch grid) on the
live rows and are undone at the feature layer (each patch takes its merged token's value), so unpadding and the
newlines see every patch and the LLM the model's own token count: the encoder saves compute only. Encoder drops are
not bound.

Projector stages (`projector.output`) run on each image's tokens as the LLM receives them: the model's own
`pack_image_features` output (base view, unpadded crops, newlines), one image at a time. The `vision` set of such a
stage holds the image features only: the `image_newline` tokens are not candidates and always reach the LLM (they
tell it where a row of crop features ends). The LLM drops the features not kept at its input. Which packed token is
a newline is found by packing marker features through the model's own `pack_image_features` (ones for features,
zero for the newline), so unpadding and OneVision's anyres_max interpolation need no copy here. Images have their
own sizes, so operators that need one token grid (`grid`, `pool`, ...) and the question (MMTok) fail at compile
time. `build_anyres` is shared with LLaVA-OneVision (llava_onevision.py), whose images are built the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.anyres_layout import anyres_layouts
from policyc.models.base import (
    AdapterFactory,
    ImageTokensHook,
    ModelAdapter,
    example_pixels,
    placement,
    register_adapter,
    text_around,
)
from policyc.models.layout import ImageLayout
from policyc.models.structure import (
    adapt_error,
    image_token,
    language_model,
    vision_encoder,
)

FEATURE_LAYERS = ("encoder stages do not run where the features concatenate several encoder layers "
                  "(vision_feature_layer is a list): merges are unmerged at one feature layer")


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True, eq=False)
class AnyresAdapter(ModelAdapter):
    """An adapter for anyres models: its calibration inputs carry the crops and `image_sizes` they need."""

    crop_size: tuple[int, int] = (336, 336)  # the tower's input size (height, width): the base view and each crop
    sample_resolution: tuple[int, int] = (336, 672)  # the calibration image's size: the first grid pinpoint
    body: nn.Module | None = field(default=None, repr=False)  # the model body: pack_image_features, image_newline

    def hook_image_tokens(self, on_tokens: ImageTokensHook) -> Callable[[], None] | None:
        """Wrap the body's `pack_image_features`: each image's packed tokens [n_i, D] go through `on_tokens` with
        their image-feature mask (False on the newline tokens), found by packing ones for the features and a zero
        newline through the same function."""
        from policyc.runtime.patching import replace_attribute  # (the runtime package imports the adapters)

        body = self.body
        if body is None:
            raise PolicyError.at(f"{type(self.model).__name__}'s pack_image_features was not found", None)
        pack = body.pack_image_features
        signature = inspect.signature(pack)

        @functools.wraps(pack)
        def pack_with_stages(*args: Any, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
            features, lengths = pack(*args, **kwargs)
            marked = signature.bind(*args, **kwargs)
            crops = marked.arguments["image_features"]
            marked.arguments["image_features"] = [torch.ones(*f.shape[:-1], 1, device=f.device) for f in crops]
            if marked.arguments.get("image_newline") is not None:
                marked.arguments["image_newline"] = torch.zeros(1, device=crops[0].device)
            marks, _ = pack(*marked.args, **marked.kwargs)
            return on_tokens(list(features), [m[:, 0] > 0.5 for m in marks], self.image_token_id), lengths

        return replace_attribute(body, "pack_image_features", pack_with_stages)

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """`text_tokens` text ids around the example image at `sample_resolution` (a pinpoint, so no padding):
        pixel_values [1, 1 + crops, 3, H, W] (the base view, then the crops row by row, as the image processors
        order them) and `image_sizes`; the placeholder run is as long as the model's own packed features."""
        device, dtype = placement(self.model)
        (height, width), (crop_h, crop_w) = self.sample_resolution, self.crop_size
        image = example_pixels((height, width))
        crops = image.unfold(1, crop_h, crop_h).unfold(2, crop_w, crop_w)  # [3, rows, cols, crop_h, crop_w]
        crops = crops.permute(1, 2, 0, 3, 4).reshape(-1, 3, crop_h, crop_w)
        pixel_values = torch.cat([example_pixels(self.crop_size)[None], crops])[None].to(device=device, dtype=dtype)
        image_sizes = torch.tensor([[height, width]], device=device)
        [count] = self.image_token_counts(pixel_values, image_sizes)
        input_ids = torch.tensor([text_around(self, text_tokens, [self.image_token_id] * count)], device=device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
                "image_sizes": image_sizes}

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of row `row`: its base view, then its crops in their grid cut to the unpadded region, each on
        the grid of its tokens (policyc/models/anyres_layout.py); a video's tokens are not drawn."""
        return anyres_layouts(self, inputs, row)

    def image_token_counts(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                           **kwargs: Any) -> list[int]:
        """The LLM tokens of each image ([images, patches, 3, H, W] with `image_sizes` [images, 2]): the lengths of
        the model's own packed features (base view, unpadded crops, newlines)."""
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)
        return [len(f) for f in getattr(features, "pooler_output", features)]


def _projector(base: nn.Module) -> nn.Module | None:
    """The multimodal projector: the one child of the model body whose class name says so."""
    found = [m for m in base.children() if "Projector" in type(m).__name__]
    return found[0] if len(found) == 1 else None


def _feature_layer(layer: int | list[int], count: int) -> int:
    """The encoder hidden state the projector reads, as an index into the `count + 1` hidden states (the last
    of several: with stages before the LLM not bound, it only names the features in `describe()`)."""
    last = layer[-1] if isinstance(layer, list | tuple) else layer
    return int(last) % (count + 1)


def build_anyres(model: nn.Module, family: str, video_token_id: int | None = None,
                 adapter: type[AnyresAdapter] = AnyresAdapter, **extra: Any) -> AnyresAdapter:
    """The `adapter` of a LLaVA-NeXT-style model (vision tower, projector, image_newline, LLM) of `family`;
    `video_token_id` adds video placeholders to the `vision` set; `extra` fields go to `adapter`."""
    config = model.config
    vision_config = config.vision_config
    encoder = vision_encoder(model, family)
    tower, vision_layers = encoder["vision_tower"], encoder["vision_layers"]
    base = next((m for m in model.children() if any(c is tower for c in m.children())), model)
    projector = _projector(base)
    if projector is None:
        raise adapt_error(model, family, "no multimodal projector found")
    if not callable(getattr(base, "pack_image_features", None)):
        raise adapt_error(model, family, "no pack_image_features on the model body")
    image_token_id = image_token(model, family)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        raise adapt_error(model, family, "the config has no image_grid_pinpoints")
    crop, patch = _pair(vision_config.image_size), _pair(vision_config.patch_size)
    has_cls = any(isinstance(getattr(m, "class_embedding", None), torch.Tensor) for m in tower.modules())
    feature_start = 1 if getattr(config, "vision_feature_select_strategy", "default") == "default" else 0
    return adapter(
        family=family,
        model=model,
        has_cls=has_cls,
        feature_layer=_feature_layer(config.vision_feature_layer, len(vision_layers)),
        feature_start=feature_start,
        keeps_cls_in_features=has_cls and feature_start == 0,
        patch_grid=None,
        projector=projector,
        image_token_id=image_token_id,
        tokens_per_image=None,
        vision_token_ids=(image_token_id,) if video_token_id is None else (image_token_id, video_token_id),
        encoder_unmerges=True,
        encoder_unsupported=FEATURE_LAYERS if isinstance(config.vision_feature_layer, list | tuple) else None,
        encoder_grid=(crop[0] // patch[0], crop[1] // patch[1]),
        crop_size=crop,
        sample_resolution=_pair(pinpoints[0]),
        body=base,
        **extra,
        **encoder,
        **language_model(model, family),
    )


@register_adapter
class LlavaNextFactory(AdapterFactory):
    """LLaVA-NeXT: encoder merges, projector stages per image (newlines kept), LLM stages and decode cache policies."""

    family = "llava_next"
    description = "LlavaNextForConditionalGeneration (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset({"llava_next"})

    def build(self, model: nn.Module) -> ModelAdapter:
        return build_anyres(model, self.family)


__all__ = ["FEATURE_LAYERS", "AnyresAdapter", "LlavaNextFactory", "build_anyres"]
