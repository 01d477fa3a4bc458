"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

Both share one structure: a SigLIP-like tower without CLS (`vision_model`), a connector whose pixel shuffle
merges `scale_factor` x `scale_factor` patches into one token before an MLP, and a Llama `text_model`.

What differs from LLaVA:
- the processor splits an image into `rows` x `cols` tiles of the encoder's size plus a global view of the
  whole image, each an encoder input of its own; `pixel_values` is [B, images, 3, H, W] (rows with fewer tiles
  are padded with all-zero images, which the model skips) and `pixel_attention_mask` [B, images, H, W] marks
  the real pixels of each (the global view of a non-square image is padded);
- in the prompt each tile is `<fake_token_around_image><row_r_col_c>` and its run of `<image>` tokens, each
  row of tiles ends in a newline, and the global view is `\\n<fake_token_around_image><global-img>`, its
  `<image>` run and a closing `<fake_token_around_image>`.

The `vision` set holds the `<image>` tokens only: they alone carry visual features (the connector's output is
scattered onto them); the markers around them are ordinary vocabulary tokens the tokenizer inserts (the model
config does not even name them), and they tell the LLM where each surviving tile lies, so policies treat them
as text. An "image" of this adapter (`tokens_per_image`, `patch_grid`, `image_sizes`) is one encoder input,
a tile or the global view: each has the same patch grid and the same `<image>` run length.

The LLM uses 1-D RoPE positions and a causal mask, as LLaVA's does: every LLM stage and decode cache policy
binds. Projector stages run per tile (each tile's tokens on their own). Encoder merges (ToMe) run per tile on the
live rows and are undone at the tower's output (each patch takes its merged token's value), so the pixel shuffle
sees every patch and the LLM every `<image>` token: the encoder saves compute only. Padded patches (the global view
of a non-square image, `pixel_attention_mask`) never merge and stay masked as keys. Encoder drops are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from policyc.models.base import AdapterFactory, ModelAdapter, example_pixels, placement, register_adapter, text_around
from policyc.models.layout import Block, ImageLayout, image_runs, layout_error, numbered, view_of
from policyc.models.structure import (
    adapt_error,
    config_int,
    image_token,
    language_model,
    vision_encoder,
)

MODEL_TYPES = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}
SAMPLE_SPLIT = (2, 2)  # tiles (rows, columns) of the calibration image, plus its global view


def image_prompt(rows: int, cols: int, tokens: int, image: int, fake: int, global_image: int, newline: int,
                 row_col: list[list[int]]) -> list[int]:
    """The ids the Idefics3/SmolVLM processor writes for one image: `rows` x `cols` tiles (0 x 0: the image
    unsplit), each `fake, row_col[r][c]` and `tokens` image ids, a newline after each row of tiles, then the
    global view `newline, fake, global_image`, its image ids and `fake` (unsplit: without the newline)."""
    ids: list[int] = []
    for r in range(rows):
        for c in range(cols):
            ids += [fake, row_col[r][c]] + [image] * tokens
        ids.append(newline)
    if rows * cols:
        ids.append(newline)
    return ids + [fake, global_image] + [image] * tokens + [fake]


def tile(image: torch.Tensor, rows: int, cols: int, size: int) -> torch.Tensor:
    """[rows * cols + 1, 3, size, size]: `image` [3, rows * size, cols * size] cut into tiles, row-major, then
    the whole image shrunk to `size` x `size` (the global view); 0 x 0: the image alone, [1, 3, size, size]."""
    if rows * cols == 0:
        return image[None]
    tiles = image.unfold(1, size, size).unfold(2, size, size)  # [3, rows, cols, size, size]
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, size, size)
    overview = nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)
    return torch.cat([tiles, overview])


def shuffled_grid(adapter: ModelAdapter) -> tuple[int, int]:
    """The grid one tile's tokens tile after a pixel shuffle of `encoder_patches_per_token` patches, row-major (the
    shuffle folds each s x s block of the tile's patch grid into one token and keeps the blocks in raster order)."""
    assert adapter.patch_grid is not None  # every tile has the tower's own grid
    side = math.isqrt(adapter.encoder_patches_per_token)
    return adapter.patch_grid[0] // side, adapter.patch_grid[1] // side


def tile_images(adapter: ModelAdapter, input_ids: torch.Tensor) -> list[tuple[list[int], tuple[int, int]]]:
    """Per image of one prompt row `input_ids` [L]: the visual-token index of each encoder input's run of `<image>`
    tokens (its tiles row-major, its global view last) and its tiles' (rows, columns) grid ((0, 0): unsplit).

    The processor's layout (`image_prompt`) tells them apart with ids the config does not name: the token before a
    run is `<global-img>` for a global view (the prompt's last run is one) and `<row_r_col_c>` for a tile; a tile
    ends its row of tiles where the next run starts more than 2 tokens later (`\\n` before the next row's
    `<fake_token_around_image><row_r_col_c>`)."""
    tokens = adapter.tokens_per_image
    assert tokens is not None  # set by the factory
    runs = [(position + offset, index + offset) for position, index, length in image_runs(adapter, input_ids)
            for offset in range(0, length, tokens)]
    if not runs or runs[0][0] == 0:
        raise layout_error("no run of <image> tokens with a marker before it")
    global_id = int(input_ids[runs[-1][0] - 1])
    images: list[tuple[list[int], tuple[int, int]]] = []
    tiles: list[tuple[int, int]] = []
    for position, index in runs:
        tiles.append((position, index))
        if int(input_ids[position - 1]) != global_id:
            continue
        gaps = [after[0] - before[0] - tokens for before, after in pairwise(tiles[:-1])]
        count = len(tiles) - 1
        columns = next((i + 1 for i, gap in enumerate(gaps) if gap != 2), count)
        ends = [i for i, gap in enumerate(gaps) if gap != 2]
        if count and (count % columns or ends != list(range(columns - 1, count - 1, columns))):
            raise layout_error(f"the {count} tiles of image {len(images) + 1} form no rows x columns grid in the "
                               "prompt (Idefics3's <row_r_col_c> markers, a newline after each row)")
        images.append(([i for _, i in tiles], (count // columns, columns) if count else (0, 0)))
        tiles = []
    return images


@dataclass(frozen=True, eq=False)
class Idefics3Adapter(ModelAdapter):
    """An Idefics3/SmolVLM adapter: its calibration inputs are tiles, a global view and their pixel mask."""

    image_size: int = 512  # pixels per side of one encoder input (a tile or the global view)

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of row `row`: its tiles in their rows x columns grid, then its global view (an unsplit image:
        the global view alone), each encoder input ([3, H, W], `pixel_values[row, i]` for the prompt's i-th run of
        `<image>` tokens) on the grid its pixel-shuffled tokens tile, row-major. `tile_images` finds the images
        and their grids in the prompt."""
        grid = shuffled_grid(self)
        pixels = inputs["pixel_values"][row]
        images = tile_images(self, inputs["input_ids"][row])
        if sum(len(tiles) for tiles, _ in images) > pixels.shape[0]:
            raise layout_error(f"row {row} has more tiles and global views than its {pixels.shape[0]} pixel_values")
        layouts, encoder_input = [], 0
        for k, (tiles, split) in enumerate(images):
            views = [view_of(f"tile {t // split[1] + 1},{t % split[1] + 1}", pixels[encoder_input + t], grid, start)
                     for t, start in enumerate(tiles[:-1])]
            encoder_input += len(views)
            overview = view_of("global view" if views else "", pixels[encoder_input], grid, tiles[-1])
            encoder_input += 1
            if not views:
                layouts.append(ImageLayout(numbered(k, len(images)), (Block((overview,)),)))
                continue
            detail = f"{split[0]}x{split[1]} tiles + global view"
            layouts.append(ImageLayout(numbered(k, len(images), detail), (Block(tuple(views), split),
                                                                           Block((overview,)))))
        return layouts

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """`text_tokens` text ids around the example image split as the processor splits a large image
        (`SAMPLE_SPLIT` tiles plus its global view). The model config names only the image id, so ordinary
        text ids stand in for the tokenizer's markers (`<fake_token_around_image>`, `<row_r_col_c>`,
        `<global-img>`, newline); they count as text, as the markers do."""
        rows, cols = SAMPLE_SPLIT
        assert self.tokens_per_image is not None  # set by the factory
        ordinary = text_around(self, text_tokens + 3 + rows * cols, [])
        text, (fake, global_image, newline, *row_col) = ordinary[:text_tokens], ordinary[text_tokens:]
        grid = [row_col[r * cols:(r + 1) * cols] for r in range(rows)]
        prompt = image_prompt(rows, cols, self.tokens_per_image, self.image_token_id, fake, global_image, newline,
                              grid)
        ids = text[:text_tokens // 2] + prompt + text[text_tokens // 2:]
        pixels = tile(example_pixels((rows * self.image_size, cols * self.image_size)), rows, cols, self.image_size)
        device, dtype = placement(self.model)
        input_ids = torch.tensor([ids], device=device)
        return {"input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": pixels[None].to(device=device, dtype=dtype),
                "pixel_attention_mask": torch.ones(1, pixels.shape[0], self.image_size, self.image_size,
                                                   dtype=torch.bool, device=device)}


@register_adapter
class Idefics3Factory(AdapterFactory):
    """Idefics3 and SmolVLM: encoder merges, projector stages per tile, LLM stages and decode cache policies."""

    family = "idefics3"
    description = "Idefics3 and SmolVLM (encoder merges, per-tile projector, LLM and decode stages)"
    model_types = frozenset(MODEL_TYPES)

    def build(self, model: nn.Module) -> ModelAdapter:
        config = model.config
        vision_config = config.vision_config
        encoder = vision_encoder(model, self.family)
        layers = encoder["vision_layers"]
        connectors = [m for m in model.modules() if type(m).__name__.endswith("Connector")]
        if len(connectors) != 1:
            raise adapt_error(model, self.family, "no single connector (pixel shuffle and projection) found")
        image_token_id = image_token(model, self.family)
        size, patch = config_int(vision_config, "image_size"), config_int(vision_config, "patch_size")
        scale = config_int(config, "scale_factor") or 2
        if size is None or patch is None:
            raise adapt_error(model, self.family, "the vision config has no integer image_size and patch_size")
        side = size // patch
        return Idefics3Adapter(
            family=self.family,
            model=model,
            has_cls=False,
            feature_layer=len(layers),
            feature_start=0,
            keeps_cls_in_features=False,
            patch_grid=(side, side),
            projector=connectors[0],
            image_token_id=image_token_id,
            tokens_per_image=side * side // (scale * scale),
            encoder_patches_per_token=scale * scale,
            encoder_unmerges=True,
            image_size=size,
            **encoder,
            **language_model(model, self.family),
        )


__all__ = ["MODEL_TYPES", "Idefics3Adapter", "Idefics3Factory", "image_prompt", "shuffled_grid", "tile", "tile_images"]
