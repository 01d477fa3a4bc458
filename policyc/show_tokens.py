"""`--show-tokens`: draw, per stage, every image of the prompt as the encoder saw it, with the cells whose tokens
were dropped darkened and merged ones tinted (one panel per stage and layer, from `policyc.report.StageTokens`).

The pictures come from `ModelAdapter.image_layouts` (policyc/models/layout.py): each image under its caption, its
blocks left to right (Idefics3/SmolVLM and InternVL: the tiles in their rows x columns grid as they cover the image,
then the global view or thumbnail; LLaVA-NeXT/OneVision: the base view, then the crops put together and unpadded,
thin lines where crops meet), every view at the size the encoder saw it; several images side by side, in as many
lines as keep a panel about 4:3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policyc.models.layout import ImageLayout, View
from policyc.report import StageTokens

DROPPED = (0.0, 0.0, 0.0, 0.72)  # RGBA over a dropped token's cell
MERGED = (0.15, 0.35, 0.95, 0.55)  # RGBA over a token merged into another
TILE_GAP, BLOCK_GAP, IMAGE_GAP, CAPTION = 0.02, 0.08, 0.15, 0.12  # spacing, in units of the tallest view


def cell_shades(tokens: Sequence[int], stage: StageTokens) -> list[tuple[float, float, float, float] | None]:
    """The shade over each cell of a view whose token is `tokens[i]` (a visual-token index, as `View.tokens`):
    DROPPED where the token did not survive `stage`, MERGED where it was merged into another, None where kept."""
    kept = set(stage.kept_tokens)
    return [MERGED if token in stage.merged else None if token in kept else DROPPED for token in tokens]


@dataclass(frozen=True)
class Placed:
    """A view at (x, y), its top left corner on the panel's canvas (in pixels of the views)."""

    view: View
    x: float
    y: float


@dataclass(frozen=True)
class Canvas:
    """Every view of the prompt placed on one canvas of `width` x `height`, and the images' captions (text, x, y)."""

    views: list[Placed]
    captions: list[tuple[str, float, float]]
    width: float
    height: float


def _place_image(image: ImageLayout, unit: float) -> tuple[list[Placed], float, float]:
    """The views of one image placed from (0, 0): its blocks left to right, each block's views in its grid."""
    placed, x, tallest = [], 0.0, 0.0
    for block in image.blocks:
        rows, cols = block.grid
        cells = [block.views[r * cols:(r + 1) * cols] for r in range(rows)]
        widths = [max(row[c].pixels.shape[2] for row in cells if c < len(row)) for c in range(cols)]
        heights = [max(view.pixels.shape[1] for view in row) for row in cells]
        gap = TILE_GAP * unit
        for r, row in enumerate(cells):
            for c, view in enumerate(row):
                placed.append(Placed(view, x + sum(widths[:c]) + c * gap, sum(heights[:r]) + r * gap))
        x += sum(widths) + (cols - 1) * gap + BLOCK_GAP * unit
        tallest = max(tallest, sum(heights) + (rows - 1) * gap)
    return placed, x - BLOCK_GAP * unit, tallest


def place(images: Sequence[ImageLayout]) -> Canvas:
    """Every image's views on one canvas: images side by side in lines (as many per line as bring the canvas
    closest to 4:3), each under its caption."""
    unit = max(view.pixels.shape[1] for image in images for view in image.views)
    caption = CAPTION * unit if any(image.caption for image in images) else 0.0
    laid = [_place_image(image, unit) for image in images]
    best: Canvas | None = None
    for per_line in range(1, len(images) + 1):
        views, captions, y, width = [], [], 0.0, 0.0
        for start in range(0, len(images), per_line):
            x, line_height = 0.0, 0.0
            for image, (placed, w, h) in zip(images[start:start + per_line], laid[start:start + per_line],
                                             strict=True):
                captions.append((image.caption, x, y))
                views += [Placed(p.view, x + p.x, y + caption + p.y) for p in placed]
                x += w + IMAGE_GAP * unit
                line_height = max(line_height, caption + h)
            width = max(width, x - IMAGE_GAP * unit)
            y += line_height + IMAGE_GAP * unit
        canvas = Canvas(views, captions, width, y - IMAGE_GAP * unit)
        if best is None or abs(math.log(canvas.width / canvas.height / (4 / 3))) < \
                abs(math.log(best.width / best.height / (4 / 3))):
            best = canvas
    assert best is not None  # at least one image
    return best


def _draw(axis: Any, canvas: Canvas, pictures: list[Any], stage: StageTokens | None) -> None:
    """One panel: every view's picture, its cell lines, crop seams and (with `stage`) the shades of its cells."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rectangles, colors = [], []
    for placed, picture in zip(canvas.views, pictures, strict=True):
        view, x, y = placed.view, placed.x, placed.y
        height, width = view.pixels.shape[1:]
        axis.imshow(picture, extent=(x, x + width, y + height, y))
        rows, cols = view.grid
        cell_h, cell_w = height / rows, width / cols
        if stage is not None:
            axis.hlines([y + r * cell_h for r in range(1, rows)], x, x + width, colors="white", linewidth=0.3,
                        alpha=0.5)
            axis.vlines([x + c * cell_w for c in range(1, cols)], y, y + height, colors="white", linewidth=0.3,
                        alpha=0.5)
            for cell, color in enumerate(cell_shades(view.tokens, stage)):
                if color is not None:
                    r, c = divmod(cell, cols)
                    rectangles.append(Rectangle((x + c * cell_w, y + r * cell_h), cell_w, cell_h))
                    colors.append(color)
        seams_y, seams_x = view.seams
        axis.hlines([y + s for s in seams_y], x, x + width, colors="0.55", linewidth=0.8)
        axis.vlines([x + s for s in seams_x], y, y + height, colors="0.55", linewidth=0.8)
    if rectangles:
        axis.add_collection(PatchCollection(rectangles, facecolors=colors, linewidths=0))
    for text, x, y in canvas.captions:
        if text:
            axis.text(x, y, text, fontsize=7, va="top", ha="left")
    axis.set_xlim(0, canvas.width)
    axis.set_ylim(canvas.height, 0)
    axis.set_aspect("equal")
    axis.axis("off")


def scaled_display(images: Sequence[ImageLayout]) -> Callable[[torch.Tensor], Any]:
    """[3, H, W] -> [H, W, 3] in [0, 1]: the pixels scaled by the smallest and largest value of every view."""
    values = torch.cat([view.pixels.detach().float().flatten().cpu() for image in images for view in image.views])
    low, high = float(values.min()), float(values.max())
    return lambda pixels: ((pixels.detach().float().cpu() - low) / max(high - low, 1e-6)).clamp(0, 1) \
        .permute(1, 2, 0).numpy()


def draw_kept_tokens(path: str | Path, images: Sequence[ImageLayout], stages: Sequence[StageTokens],
                     title: str = "", display: Callable[[torch.Tensor], Any] | None = None) -> Path:
    """Write a PNG: every image of `images` (`ModelAdapter.image_layouts`) once as given, then once per entry of
    `stages` with dropped tokens' cells darkened and merged ones tinted. `display` turns a view's pixels
    [3, H, W] into [H, W, 3] in [0, 1] (default: `scaled_display`; `policyc run` undoes the processor's
    normalization)."""
    if not images:
        raise ValueError("no image to draw")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    canvas = place(images)
    show = display or scaled_display(images)
    pictures = [show(placed.view.pixels) for placed in canvas.views]
    aspect = canvas.width / canvas.height
    panels = len(stages) + 1
    per_row = min(panels, max(1, round(4 / max(aspect, 1.0))))
    lines = (panels + per_row - 1) // per_row
    panel_w, panel_h = 3 * max(aspect, 1.0), 3 * max(1 / aspect, 1.0) + 0.3
    figure, axes = plt.subplots(lines, per_row, figsize=(panel_w * per_row, panel_h * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    _draw(axes.flat[0], canvas, pictures, None)
    cells = sum(view.grid[0] * view.grid[1] for image in images for view in image.views)
    views = len(canvas.views)
    detail = f"{cells} token cells" if views == 1 else \
        f"{len(images)} image{'s' * (len(images) > 1)}, {views} views, {cells} token cells"
    axes.flat[0].set_title(f"input ({detail})", fontsize=9)
    for axis, stage in zip(list(axes.flat)[1:], stages, strict=False):
        _draw(axis, canvas, pictures, stage)
        where = stage.point + ("" if stage.layer is None else f"[{stage.layer}]")
        axis.set_title(f"{stage.label}\n{where}: kept {stage.after} of {stage.before}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["DROPPED", "MERGED", "Canvas", "Placed", "cell_shades", "draw_kept_tokens", "place", "scaled_display"]
