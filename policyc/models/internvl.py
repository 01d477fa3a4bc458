"""InternVL (`InternVLForConditionalGeneration`: InternVL 2.5 / 3 in transformers' format, arXiv:2412.05271).

What differs from LLaVA:
- dynamic tiling: the processor cuts an image into 448x448 tiles (plus a thumbnail); each tile is one encoder
  image, so an image has a size-dependent number of tiles and the prompt frames all their `<IMG_CONTEXT>` tokens
  with `<img>` ... `</img>`;
- InternViT keeps a CLS token, which the features drop (`vision_feature_select_strategy` "default"); a pixel
  shuffle folds 2x2 patches into one token (downsample_ratio 0.5: 1024 patches -> 256 tokens per tile) before an
  MLP projector;
- the LLM is a Qwen2 or Llama decoder: causal, 1-D RoPE. LLM stages and decode caches run as on LLaVA, so FastV
  is proven against the LLaVA reference (tests/reference/fastv.py), which runs unchanged on InternVL.

The `vision` set holds the `<IMG_CONTEXT>` tokens (not `<img>`, `</img>`); an image's tiles count as images of
`image_seq_length` tokens each. Projector stages run per tile. Encoder merges (ToMe) run per tile on the live rows
(never the CLS token) and are undone at the tower's output (each patch takes its merged token's value), so the pixel
shuffle sees every patch and the LLM every `<IMG_CONTEXT>` token: the encoder saves compute only. Encoder drops are
refused; so are encoder stages where the features are not the tower's last layer (`vision_feature_layer` != -1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from policyc.models.base import AdapterFactory, ModelAdapter, register_adapter
from policyc.models.idefics3 import shuffled_grid
from policyc.models.structure import (
    adapt_error,
    image_token,
    language_model,
    vision_encoder,
)

FEATURE_LAYER = ("encoder stages run on InternVL only where the features are the tower's last layer "
                 "(vision_feature_layer -1): this model reads an earlier layer's hidden states, which encoder merges "
                 "are not unmerged into")


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True, eq=False)
class InternVLAdapter(ModelAdapter):
    """An InternVL adapter: `--show-tokens` draws the prompt's first tile."""

    def first_image(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The prompt's first tile ([3, H, W]; the image itself where it is one tile) and the grid its
        pixel-shuffled tokens tile, row-major."""
        return inputs["pixel_values"][0], shuffled_grid(self)


@register_adapter
class InternVLFactory(AdapterFactory):
    """InternVL 2.5 / 3 (transformers' `internvl` format): encoder merges, projector stages per tile, LLM stages and
    decode cache policies."""

    family = "internvl"
    description = "InternVL (encoder merges, per-tile projector, LLM and decode stages)"
    model_types = frozenset({"internvl"})

    def build(self, model: nn.Module) -> ModelAdapter:
        config = model.config
        vision_config = config.vision_config
        encoder = vision_encoder(model, self.family)
        layers = encoder["vision_layers"]
        projectors = [m for m in model.modules() if type(m).__name__.endswith("MultiModalProjector")]
        if len(projectors) != 1:
            raise adapt_error(model, self.family, "no single multi-modal projector")
        image_token_id = image_token(model, self.family)
        (height, width), (patch_h, patch_w) = _pair(vision_config.image_size), _pair(vision_config.patch_size)
        fold = round(1 / config.downsample_ratio)
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise adapt_error(model, self.family, "several vision feature layers are not supported")
        count = len(layers)
        return InternVLAdapter(
            family=self.family,
            model=model,
            has_cls=True,
            feature_layer=feature_layer % (count + 1),
            feature_start=1 if config.vision_feature_select_strategy == "default" else 0,
            keeps_cls_in_features=config.vision_feature_select_strategy != "default",
            patch_grid=(height // patch_h, width // patch_w),
            projector=projectors[0],
            image_token_id=image_token_id,
            tokens_per_image=config.image_seq_length,
            encoder_patches_per_token=fold * fold,
            encoder_unsupported=None if feature_layer % (count + 1) == count else FEATURE_LAYER,
            encoder_unmerges=True,
            **encoder,
            **language_model(model, self.family),
        )


__all__ = ["InternVLAdapter", "InternVLFactory"]
