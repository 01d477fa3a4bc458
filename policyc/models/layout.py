"""Where the LLM tokens of a prompt's images lie on the pictures the encoder saw (`policyc run --show-tokens`).

Each image of a prompt row becomes an `ImageLayout`: blocks drawn left to right, each a grid of `View`s (the tiles
of Idefics3/SmolVLM and InternVL in their rows x columns grid as they cover the image, then the global view;
LLaVA-NeXT/OneVision's base view, then its crops unpadded; one view on the other families). A view is one
picture as the encoder saw it ([3, H, W], normalized), cut into a grid of token cells; each cell names its token
by its index among the row's visual tokens in prompt order (`ModelAdapter.visual_mask`), the index
`policyc.report.StageTokens.kept_tokens` uses. Tokens without a cell (CLS, newlines) are not drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from policyc.errors import PolicyError

if TYPE_CHECKING:
    from policyc.models.base import ModelAdapter


@dataclass(frozen=True)
class View:
    """One picture and the grid of tokens over it: `tokens[r * columns + c]` is the visual-token index (among the
    row's visual tokens) of cell (r, c). `seams`: the pixel rows and columns (from the top left) where crops the
    picture is pieced from meet."""

    caption: str
    pixels: torch.Tensor  # [3, H, W], normalized as the encoder saw it
    grid: tuple[int, int]  # (rows, columns) of cells over the whole picture
    tokens: tuple[int, ...]  # rows * columns visual-token indices, row-major
    seams: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())


@dataclass(frozen=True)
class Block:
    """Views drawn together in a (rows, columns) grid, row-major (tiles as they cover the image)."""

    views: tuple[View, ...]
    grid: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class ImageLayout:
    """One image of the prompt: its blocks, drawn left to right under `caption`."""

    caption: str
    blocks: tuple[Block, ...]

    @property
    def views(self) -> list[View]:
        return [view for block in self.blocks for view in block.views]


def view_of(caption: str, pixels: torch.Tensor, grid: tuple[int, int], first: int) -> View:
    """A view whose rows x columns cells are the visual tokens `first`, `first + 1`, ... row-major."""
    return View(caption, pixels, grid, tuple(range(first, first + grid[0] * grid[1])))


def one_view(caption: str, pixels: torch.Tensor, grid: tuple[int, int], first: int) -> ImageLayout:
    """An image drawn as one view (`view_of`) under `caption`."""
    return ImageLayout(caption, (Block((view_of("", pixels, grid, first),)),))


def image_runs(adapter: ModelAdapter, input_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(position, visual-token index, length) of each run of image tokens in one prompt row `input_ids` [L], in
    order (a video's placeholders are visual tokens too, so they count in the index, but are no run)."""
    ids = input_ids.cpu()
    visual = adapter.visual_mask(ids)
    index = torch.cumsum(visual.long(), 0) - 1
    edge = torch.zeros(1, dtype=torch.long)
    edges = torch.diff(torch.cat([edge, (ids == adapter.image_token_id).long(), edge]))
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return [(int(s), int(index[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def images_before(adapter: ModelAdapter, input_ids: torch.Tensor, row: int) -> int:
    """Images (`ModelAdapter.image_sizes`: encoder inputs of a fixed size, else runs) in the rows before `row`."""
    return sum(len(adapter.image_sizes(earlier)) for earlier in input_ids[:row])


def fixed_size_layouts(adapter: ModelAdapter, inputs: Mapping[str, torch.Tensor], row: int, grid: tuple[int, int],
                       skip: int = 0) -> list[ImageLayout]:
    """One view per image of `tokens_per_image` tokens (LLaVA, Gemma 3): `pixel_values` [images, 3, H, W] of every
    row in order; an image's cells are its tokens from the `skip`-th on (1: past a CLS token)."""
    if skip < 0 or adapter.tokens_per_image != grid[0] * grid[1] + skip:
        raise layout_error(f"{adapter.tokens_per_image} tokens per image do not tile a {grid[0]}x{grid[1]} grid")
    input_ids = inputs["input_ids"]
    first = images_before(adapter, input_ids, row)
    sizes = adapter.image_sizes(input_ids[row])
    pixels = inputs["pixel_values"]
    if pixels.shape[0] < first + len(sizes):
        raise layout_error(f"the prompt has {first + len(sizes)} images up to row {row} but pixel_values only "
                           f"{pixels.shape[0]}")
    starts = [index for _, index, length in image_runs(adapter, input_ids[row]) for index in
              range(index, index + length, adapter.tokens_per_image or length)]
    return [one_view(numbered(k, len(sizes)), pixels[first + k], grid, start + skip) for k, start in enumerate(starts)]


def numbered(index: int, count: int, detail: str = "") -> str:
    """The caption of image `index` (0-based) of `count`: "image 2 of 3: detail", or `detail` alone for one image."""
    if count == 1:
        return detail
    return f"image {index + 1} of {count}" + (f": {detail}" if detail else "")


def layout_error(message: str) -> PolicyError:
    return PolicyError.at(f"--show-tokens cannot place the image tokens: {message}", None,
                          "run without --show-tokens: the table of tokens kept per stage still prints")


__all__ = ["Block", "ImageLayout", "View", "fixed_size_layouts", "image_runs", "images_before", "layout_error",
           "numbered", "one_view", "view_of"]
