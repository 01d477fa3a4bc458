"""`--show-tokens` pictures (policyc/show_tokens.py, `ModelAdapter.image_layouts`): every image of the prompt, every
tile with its global view (Idefics3/SmolVLM, InternVL), the base view and unpadded crops (LLaVA-NeXT/OneVision), in
their grids; the darkened cells of each view are exactly the tokens behind it that did not survive the stage.

The expected layouts are written out here by hand from each processor's rules (tile counts, crop grids, unpadding,
anyres_max), and the tokens behind each view are read off the prompt independently of the adapters: an image's
tokens in prompt order, view after view, row-major, skipping a CLS token and LLaVA-NeXT's row newlines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_gemma3 import make_gemma3_inputs, single_gemma3, tiny_gemma3
from tiny_idefics3 import IMAGE_ID as IDEFICS_IMAGE_ID
from tiny_idefics3 import make_idefics3_inputs, tiny_idefics3
from tiny_idefics3 import single_row as single_idefics3
from tiny_internvl import make_internvl_inputs, single_internvl, tiny_internvl
from tiny_llava_next import VIDEO_ID, make_anyres_inputs, tiny_anyres
from tiny_llava_next import single_row as single_anyres
from tiny_models import make_inputs, make_qwen_inputs, tiny_llava_clip, tiny_qwen2_vl

import policyc
from policyc.errors import PolicyError
from policyc.models import adapt
from policyc.models.internvl import tile_grid
from policyc.models.layout import ImageLayout
from policyc.report import report_from_last_prefill
from policyc.show_tokens import DROPPED, cell_shades, draw_kept_tokens

Grid = tuple[int, int]


@dataclass(frozen=True)
class Expected:
    """One image: its blocks ((rows, columns) of views, each view's token grid), the tokens before its first cell
    (a CLS token), whether each view after the first ends its rows with a newline token (anyres crops) and the tokens
    after its last view (a base view's newline)."""

    blocks: tuple[tuple[Grid, tuple[Grid, ...]], ...]
    lead: int = 0
    newlines: bool = False
    trail: int = 0


def one(grid: Grid, **kwargs: Any) -> Expected:
    return Expected((((1, 1), (grid,)),), **kwargs)


def tiled(split: Grid, grid: Grid) -> Expected:
    return Expected(((split, (grid,) * (split[0] * split[1])), ((1, 1), (grid,))))


def anyres(crops: Grid) -> Expected:
    return Expected((((1, 1), ((4, 4),)), ((1, 1), (crops,))), newlines=True)


def smooth_tiles(rows: int, cols: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[rows * cols + 1, 3, size, size]: a smooth random image cut into rows x columns tiles, row-major, then shrunk
    whole to one tile (the thumbnail), as InternVL's processor lays out an image."""
    coarse = torch.randn(1, 3, rows * 2, cols * 2, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(coarse, size=(rows * size, cols * size), mode="bicubic")[0]
    tiles = image.unfold(1, size, size).unfold(2, size, size).permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)
    thumbnail = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)
    return torch.cat([tiles, thumbnail])


def internvl_inputs(batch: int = 1) -> dict[str, torch.Tensor]:
    """Per row an image of 2x3 tiles + thumbnail (smooth, so the grid can be told from the thumbnail), then one
    single-tile image."""
    inputs = make_internvl_inputs(batch, tiles=(7, 1), pad_left=2)
    for row in range(batch):
        inputs["pixel_values"][8 * row:8 * row + 7] = smooth_tiles(2, 3, seed=row)
    return inputs


Case = tuple[Callable[[], Any], Callable[[Any], dict[str, torch.Tensor]], list[Expected]]
CASES: dict[str, Case] = {
    "llava": (tiny_llava_clip, lambda m: make_inputs(m, images=2), [one((4, 4))] * 2),
    "llava_cls": (lambda: tiny_llava_clip(strategy="full"), lambda m: make_inputs(m, images=2),
                  [one((4, 4), lead=1)] * 2),
    "gemma3": (tiny_gemma3, lambda _m: make_gemma3_inputs(images=2), [one((4, 4))] * 2),
    "qwen2_vl": (tiny_qwen2_vl, lambda _m: make_qwen_inputs(grids=((8, 8), (4, 6))), [one((4, 4)), one((2, 3))]),
    "idefics3": (tiny_idefics3, lambda _m: make_idefics3_inputs(images=(((2, 3), (0, 0), (1, 2)),)),
                 [tiled((2, 3), (2, 2)), one((2, 2)), tiled((1, 2), (2, 2))]),
    "smolvlm": (lambda: tiny_idefics3(smolvlm=True), lambda _m: make_idefics3_inputs(images=(((2, 1), (2, 2)),)),
                [tiled((2, 1), (2, 2)), tiled((2, 2), (2, 2))]),
    "internvl": (tiny_internvl, lambda _m: internvl_inputs(), [tiled((2, 3), (4, 4)), one((4, 4))]),
    # 40x24 -> pinpoint 64x32: 2x1 crops, 8x4 features unpadded to 6x4; 24x64 -> 32x64: 1x2 crops, 4x8 kept
    "llava_next": (lambda: tiny_anyres("llava_next"), lambda m: make_anyres_inputs(m, [[(40, 24), (24, 64)]]),
                   [anyres((6, 4)), anyres((4, 8))]),
    # 200x64 -> 96x32: 3x1 crops, 12x4 features; anyres_max_2 (32 per base view) shrinks them by sqrt(48/32) to 9x3
    "llava_onevision": (lambda: tiny_anyres("llava_onevision"), lambda m: make_anyres_inputs(m, [[(200, 64)]]),
                        [anyres((9, 3))]),
    "llava_onevision_two": (lambda: tiny_anyres("llava_onevision"),  # several images: base views and one newline
                            lambda m: make_anyres_inputs(m, [[(30, 64), (20, 20)]]), [one((4, 4), trail=1)] * 2),
}


def view_positions(input_ids: torch.Tensor, image_ids: tuple[int, ...], expected: list[Expected]) -> list[list[int]]:
    """The prompt position behind each cell of each view, views in order: the image tokens in prompt order, per
    image its `lead` tokens skipped, then each view's cells row-major (a newline after each row of crops), then
    its `trail` tokens skipped."""
    positions = torch.nonzero(torch.isin(input_ids, torch.tensor(image_ids))).flatten().tolist()
    views, at = [], 0
    for image in expected:
        at += image.lead
        grids = [grid for _, block in image.blocks for grid in block]
        for index, (rows, cols) in enumerate(grids):
            newline = int(image.newlines and index > 0)
            views.append([positions[at + r * (cols + newline) + c] for r in range(rows) for c in range(cols)])
            at += rows * (cols + newline)
        at += image.trail
    assert at == len(positions)
    return views


def kept_after_prefill(model: Any, inputs: dict[str, torch.Tensor], policy: str) -> tuple[Any, set[int]]:
    """Compile `policy` at 50%, generate 2 tokens; the report of the prefill and the prompt positions it kept."""
    policyc.compile(model, policy, ratio="50%")
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        report = report_from_last_prefill(model.policyc, inputs["input_ids"], "tiny")
        return report, set(model.policyc.kept_positions[0].tolist())
    finally:
        model.policyc.remove()


def assert_structure(layouts: list[ImageLayout], expected: list[Expected]) -> None:
    assert [[(block.grid, tuple(view.grid for view in block.views)) for block in image.blocks]
            for image in layouts] == [list(image.blocks) for image in expected]
    if len(layouts) > 1:
        assert all(image.caption.startswith(f"image {k + 1} of {len(layouts)}") for k, image in enumerate(layouts))


@pytest.mark.parametrize("family", sorted(CASES))
def test_every_view_of_every_image_darkens_exactly_its_dropped_tokens(family: str, tmp_path: Path) -> None:
    """DivPrune at 50%: each view (tile, global view, base view, unpadded crops, image) of each of the prompt's
    images is laid out as its processor lays it out, and its darkened cells are exactly its tokens that did not
    reach the LLM; some of each image's tokens are dropped, some kept; a PNG renders."""
    build, make, expected = CASES[family]
    model = build()
    inputs = make(model)
    adapter = adapt(model)
    layouts = adapter.image_layouts(inputs)
    assert adapter.draws_tokens
    assert_structure(layouts, expected)
    report, kept = kept_after_prefill(model, inputs, "divprune")
    views = [view for image in layouts for view in image.views]
    positions = view_positions(inputs["input_ids"][0], (adapter.image_token_id,), expected)
    assert len(views) == len(positions)
    for view, behind in zip(views, positions, strict=True):
        shaded = [cell for cell, shade in enumerate(cell_shades(view.tokens, report.kept[0])) if shade == DROPPED]
        assert shaded == [cell for cell, position in enumerate(behind) if position not in kept], view.caption
    for image in layouts:
        cells = [t for view in image.views for t in view.tokens]
        assert 0 < len(set(cells) - set(report.kept[0].kept_tokens)) < len(cells)
    path = draw_kept_tokens(tmp_path / "kept.png", layouts, report.kept, "divprune")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_views_hold_the_pictures_the_encoder_saw() -> None:
    """Tiles, global views and thumbnails are the encoder inputs in prompt order; an anyres image's base view is its
    first view and its crops view the crops put together, cut to the unpadded region (40x24: rows 8..56 of 64)."""
    idefics = make_idefics3_inputs(images=(((2, 3), (0, 0)),))
    views = [v for image in adapt(tiny_idefics3()).image_layouts(idefics) for v in image.views]
    assert all(torch.equal(v.pixels, idefics["pixel_values"][0, i]) for i, v in enumerate(views))
    internvl = internvl_inputs()
    views = [v for image in adapt(tiny_internvl()).image_layouts(internvl) for v in image.views]
    assert all(torch.equal(v.pixels, internvl["pixel_values"][i]) for i, v in enumerate(views))
    model = tiny_anyres("llava_next")
    inputs = make_anyres_inputs(model, [[(40, 24)]])
    [image] = adapt(model).image_layouts(inputs)
    base, crops = image.views
    pixels = inputs["pixel_values"][0]
    assert torch.equal(base.pixels, pixels[0])
    assert torch.equal(crops.pixels, torch.cat([pixels[1], pixels[2]], dim=1)[:, 8:56])
    assert crops.seams == ((24,), ())  # where the two crops meet


@pytest.mark.parametrize("rows, cols", [(2, 3), (3, 2), (1, 4), (4, 1), (2, 2)])
def test_internvl_tells_its_tile_grid_from_the_thumbnail(rows: int, cols: int) -> None:
    tiles = smooth_tiles(rows, cols, seed=rows * 10 + cols)
    assert tile_grid(tiles[:-1], tiles[-1]) == (rows, cols)


def test_idefics3_tiles_that_form_no_grid_are_refused() -> None:
    """A prompt whose row ends do not fall every `columns` tiles (an extra token after the first tile of a 2x2
    split) is no grid the processor writes: a PolicyError, not a guess."""
    inputs = make_idefics3_inputs(images=(((2, 2),),))
    ids = inputs["input_ids"][0].tolist()
    first_tile_end = ids.index(IDEFICS_IMAGE_ID) + 4
    ids.insert(first_tile_end, 10)
    inputs["input_ids"] = torch.tensor([ids])
    with pytest.raises(PolicyError, match="form no rows x columns grid"):
        adapt(tiny_idefics3()).image_layouts(inputs)


ROWS: dict[str, tuple[Callable[[], Any], Callable[[Any], dict[str, torch.Tensor]], Callable[..., Any]]] = {
    "gemma3": (tiny_gemma3, lambda _m: make_gemma3_inputs(batch=2, images=2, pad_left=2), single_gemma3),
    "idefics3": (tiny_idefics3, lambda _m: make_idefics3_inputs(2, (((2, 1),), ((0, 0), (1, 2))), pad_left=1),
                 single_idefics3),
    "internvl": (tiny_internvl, lambda _m: internvl_inputs(batch=2), single_internvl),
    "llava_next": (lambda: tiny_anyres("llava_next"),
                   lambda m: make_anyres_inputs(m, [[(40, 24)], [(24, 64)]], pad_left=3), single_anyres),
}


@pytest.mark.parametrize("family", sorted(ROWS))
def test_a_batch_rows_layout_equals_the_row_alone(family: str) -> None:
    """`image_layouts(inputs, row)` finds row `row`'s own images among the batch's: the same views, pictures and
    tokens as the row run alone."""
    build, make, single = ROWS[family]
    model = build()
    adapter, inputs = adapt(model), make(model)
    for row in range(inputs["input_ids"].shape[0]):
        batched, alone = adapter.image_layouts(inputs, row), adapter.image_layouts(single(inputs, row))
        assert [image.caption for image in batched] == [image.caption for image in alone]
        pairs = [(a, b) for x, y in zip(batched, alone, strict=True) for a, b in zip(x.views, y.views, strict=True)]
        assert all(a.tokens == b.tokens and a.grid == b.grid and torch.equal(a.pixels, b.pixels) for a, b in pairs)


def test_onevision_draws_the_images_after_a_video_and_not_the_video() -> None:
    """A video's placeholders come first: the image is drawn on the tokens after them (64x64 -> 2x2 crops whose 8x8
    features anyres_max_2 shrinks to 5x5), and FastV's darkened cells are its dropped tokens."""
    model = tiny_anyres("llava_onevision")
    inputs = make_anyres_inputs(model, [[(64, 64)]], (3,))
    expected = [anyres((5, 5))]
    layouts = adapt(model).image_layouts(inputs)
    assert_structure(layouts, expected)
    videos = int((inputs["input_ids"][0] == VIDEO_ID).sum())
    assert layouts[0].views[0].tokens[0] == videos
    report, kept = kept_after_prefill(model, inputs, "fastv")
    for view, behind in zip(layouts[0].views, view_positions(inputs["input_ids"][0], (100,), expected), strict=True):
        shaded = [cell for cell, shade in enumerate(cell_shades(view.tokens, report.kept[-1])) if shade == DROPPED]
        assert shaded == [cell for cell, position in enumerate(behind) if position not in kept]
