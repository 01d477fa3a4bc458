"""Where LLaVA-NeXT/OneVision ("anyres") image tokens lie (`--show-tokens`): each image's base view, then its crops
put together in their grid and cut to the unpadded region their features keep.

An image's run of placeholders holds the base view's tokens (one per patch, row-major), then the crops' features
row by row, each row closed by a newline token (not drawn). The crop grid comes from the model module's own
`get_anyres_image_grid_shape`, the unpadded region from its `unpad_image` (applied to the grid's coordinates), and
the rows and columns of crop tokens (fewer than the region's patches where OneVision's anyres_max interpolates them)
from packing marker features through the model's own `pack_image_features`, as `hook_image_tokens` does. An image
whose run is the base view plus one newline (OneVision's images of a multi-image prompt) is its base view alone.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from policyc.models.layout import (
    Block,
    ImageLayout,
    View,
    image_runs,
    images_before,
    layout_error,
    numbered,
    one_view,
    view_of,
)

if TYPE_CHECKING:
    from policyc.models.llava_next import AnyresAdapter


def anyres_layouts(adapter: AnyresAdapter, inputs: Mapping[str, torch.Tensor], row: int) -> list[ImageLayout]:
    """Every image of row `row` of `inputs` (`pixel_values` [images, views, 3, H, W]: each image's base view, then
    its crops row by row; `image_sizes` [images, 2]; every row's images in order) for an `AnyresAdapter`."""
    body, grid = adapter.body, adapter.encoder_grid
    if body is None or grid is None:
        raise layout_error(f"{type(adapter.model).__name__} has no model body or encoder grid")
    input_ids, pixels, sizes = inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"].cpu()
    first = images_before(adapter, input_ids, row)
    runs = image_runs(adapter, input_ids[row])
    if pixels.dim() != 5 or pixels.shape[0] < first + len(runs) or sizes.shape[0] < first + len(runs):
        raise layout_error(f"pixel_values {tuple(pixels.shape)} and image_sizes {tuple(sizes.shape)} do not hold "
                           f"the {first + len(runs)} images up to row {row} ([images, views, 3, H, W] expected)")
    base = grid[0] * grid[1]
    layouts = []
    for k, (_, index, length) in enumerate(runs):
        views = pixels[first + k]
        if length == base + 1:
            layouts.append(one_view(numbered(k, len(runs), "base view"), views[0], grid, index))
            continue
        crops = crop_view(adapter, views, sizes[first + k], index + base, length - base)
        layouts.append(ImageLayout(numbered(k, len(runs), f"base view + {crops.caption}"),
                                   (Block((view_of("base view", views[0], grid, index),)), Block((crops,)))))
    return layouts


def crop_view(adapter: AnyresAdapter, views: torch.Tensor, size: torch.Tensor, first: int, count: int) -> View:
    """The crops of one image (`views` [n, 3, H, W], the base view first) put together and cut to the unpadded
    region, on the grid of its `count` crop tokens from visual-token index `first` (newlines included)."""
    body, config = adapter.body, adapter.model.config
    module = sys.modules[type(body).__module__]
    rows, cols = (int(v) for v in module.get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                                      config.vision_config.image_size))
    grid_h, grid_w = adapter.encoder_grid
    if views.shape[0] < 1 + rows * cols:
        raise layout_error(f"an image of size {size.tolist()} needs {rows}x{cols} crops; pixel_values holds "
                           f"{views.shape[0] - 1}")
    marks = feature_marks(adapter, rows * cols, size)
    newlines = torch.nonzero(~marks[grid_h * grid_w:]).flatten()
    lines = len(newlines)
    width = (count - lines) // max(lines, 1)
    if len(marks) != grid_h * grid_w + count or not lines or \
            not torch.equal(newlines, torch.arange(width, count, width + 1)):
        raise layout_error(f"an image's {count} crop tokens do not match the model's packing of {rows}x{cols} crops")
    coords = torch.stack(torch.meshgrid(torch.arange(rows * grid_h), torch.arange(cols * grid_w), indexing="ij"))
    kept = module.unpad_image(coords.float(), size)  # [2, h, w]: the joined feature grid's unpadded region
    top, left = int(kept[0, 0, 0]), int(kept[1, 0, 0])
    bottom, right = int(kept[0, -1, 0]) + 1, int(kept[1, 0, -1]) + 1
    height, wide = views.shape[-2:]
    patch_h, patch_w = height // grid_h, wide // grid_w
    mosaic = views[1:1 + rows * cols].reshape(rows, cols, -1, height, wide).permute(2, 0, 3, 1, 4)
    mosaic = mosaic.reshape(-1, rows * height, cols * wide)
    picture = mosaic[:, top * patch_h:bottom * patch_h, left * patch_w:right * patch_w]
    seams_y = tuple(y for r in range(1, rows) if 0 < (y := r * height - top * patch_h) < picture.shape[1])
    seams_x = tuple(x for c in range(1, cols) if 0 < (x := c * wide - left * patch_w) < picture.shape[2])
    tokens = tuple(first + r * (width + 1) + c for r in range(lines) for c in range(width))
    caption = f"{rows}x{cols} crops, unpadded"
    if (lines, width) != (bottom - top, right - left):
        caption += f" ({lines}x{width} tokens)"
    return View(caption, picture, (lines, width), tokens, (seams_y, seams_x))


def feature_marks(adapter: AnyresAdapter, crops: int, size: torch.Tensor) -> torch.Tensor:
    """[n] bool: which of an image's packed tokens (base view, then crop rows with their newlines) are features,
    packing ones for the `1 + crops` views' features and a zero newline through the model class's own
    `pack_image_features` (the class's: a compiled model wraps the instance's)."""
    body, config = adapter.body, adapter.model.config
    pack = type(body).pack_image_features
    parameters = inspect.signature(pack).parameters
    options = {name: getattr(config, name) for name in ("vision_feature_select_strategy", "vision_aspect_ratio")
               if name in parameters and getattr(config, name, None) is not None}
    grid_h, grid_w = adapter.encoder_grid
    with torch.no_grad():
        packed, _ = pack(body, image_features=[torch.ones(1 + crops, grid_h * grid_w, 1)], image_sizes=size[None],
                         image_newline=torch.zeros(1), **options)
    return packed[0][:, 0] > 0.5


__all__ = ["anyres_layouts", "crop_view", "feature_marks"]
