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
from policyc.models.layout import (
    Block,
    ImageLayout,
    image_runs,
    images_before,
    layout_error,
    numbered,
    one_view,
    view_of,
)
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


def tile_grid(tiles: torch.Tensor, thumbnail: torch.Tensor) -> tuple[int, int]:
    """The (rows, columns) grid `tiles` [n, 3, S, S] (row-major) cut from the image: the processor resizes the image
    to the grid and cuts it, and adds the whole image resized to S x S (`thumbnail` [3, S, S]) but does not say
    which grid it chose; of the grids of n tiles, the one whose tiles, put together and shrunk to S x S, come
    closest to the thumbnail (mean squared difference; the fewest rows among equals)."""
    count, channels, height, width = tiles.shape
    best: tuple[float, tuple[int, int]] | None = None
    for rows in range(1, count + 1):
        if count % rows:
            continue
        cols = count // rows
        mosaic = tiles.float().reshape(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)
        shrunk = nn.functional.interpolate(mosaic.reshape(1, channels, rows * height, cols * width),
                                           size=(height, width), mode="area")[0]
        error = float((shrunk - thumbnail.float()).square().mean())
        if best is None or error < best[0]:
            best = (error, (rows, cols))
    assert best is not None  # rows = 1 always divides
    return best[1]


@dataclass(frozen=True, eq=False)
class InternVLAdapter(ModelAdapter):
    """An InternVL adapter: `--show-tokens` draws every image's tiles in their grid, and its thumbnail."""

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of row `row`: an image of n > 1 tiles is n - 1 tiles in their grid (`tile_grid`) plus the
        thumbnail (the processor's `use_thumbnail`), one tile is the image itself; each tile ([3, H, W],
        `pixel_values` holds every row's tiles in order) on the grid its pixel-shuffled tokens tile, row-major."""
        grid, tokens = shuffled_grid(self), self.tokens_per_image
        assert tokens is not None  # image_seq_length
        input_ids, pixels = inputs["input_ids"], inputs["pixel_values"]
        offset = images_before(self, input_ids, row)  # tiles of the earlier rows
        runs = image_runs(self, input_ids[row])
        if any(length % tokens for *_, length in runs):
            raise layout_error(f"a run of image tokens is no multiple of image_seq_length ({tokens})")
        if offset + sum(length for *_, length in runs) // tokens > pixels.shape[0]:
            raise layout_error(f"row {row} has more tiles than pixel_values holds ({pixels.shape[0]})")
        layouts = []
        for k, (_, index, length) in enumerate(runs):
            count = length // tokens
            tiles = pixels[offset:offset + count]
            offset += count
            if count == 1:
                layouts.append(one_view(numbered(k, len(runs)), tiles[0], grid, index))
                continue
            rows, cols = tile_grid(tiles[:-1], tiles[-1])
            views = [view_of(f"tile {t // cols + 1},{t % cols + 1}", tiles[t], grid, index + t * tokens)
                     for t in range(count - 1)]
            thumbnail = view_of("thumbnail", tiles[-1], grid, index + (count - 1) * tokens)
            detail = f"{rows}x{cols} tiles + thumbnail"
            layouts.append(ImageLayout(numbered(k, len(runs), detail), (Block(tuple(views), (rows, cols)),
                                                                         Block((thumbnail,)))))
        return layouts


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


__all__ = ["InternVLAdapter", "InternVLFactory", "tile_grid"]
