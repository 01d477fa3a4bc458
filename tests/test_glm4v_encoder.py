"""ToMe in GLM-4.1V's and GLM-4.5V's packed vision tower (policyc/runtime/qwen_tower.py with `unmerge_after_blocks`):
merges per frame, unmerged at the blocks' output, before `post_layernorm` and the 2x2 `downsample` conv (the tower's
`last_hidden_state` is the conv's output), against the plain reference tests/reference/tome_packed.py; generate()
with the standard library's tome.tokpol, padded batches equal to single runs, a projector drop after it, and the
compile report's encoder FLOPs."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_batch_equals_single_runs, assert_tome_shrinks_only_the_encoder, tome_forward
from reference.tome_packed import tome_packed_tower
from reference.tome_qwen import groups_by_image, with_pooler_output
from test_glm4v import GRIDS
from tiny_glm4v import tiny_glm4v
from tiny_models import make_qwen_inputs, qwen_single_row

import policyc
from policyc.lang import check_source


def test_the_reference_without_merges_is_the_model() -> None:
    """With r=0 the reference's hand-written blocks, post_layernorm, downsample and merger give the model's logits."""
    model = tiny_glm4v(seed=1)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    pooler, groups, rows = tome_packed_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], 0)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(with_pooler_output(model, inputs, pooler), expected, rtol=0, atol=1e-5)
    assert all(len(group) == 1 for image in groups for group in image) and rows[0] == [64, 64]


@pytest.mark.parametrize(("moe", "seed", "r"), [(False, 0, 1), (False, 1, 3), (True, 2, 8), (False, 3, 40)])
@pytest.mark.parametrize("batch", [1, 2])
def test_tome_equals_the_reference(moe: bool, seed: int, r: int, batch: int) -> None:
    """The same merged groups per frame, the same rows per block, logits within 1e-5; r=40 merges all it can."""
    model = tiny_glm4v(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    pooler, groups, rows = tome_packed_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], r)
    expected = with_pooler_output(model, inputs, pooler)
    logits, images = tome_forward(model, inputs, r)
    assert groups_by_image(images.merged_into, inputs["image_grid_thw"]) == groups
    assert images.encoder_rows.tolist() == rows
    assert any(len(group) > 1 for image in groups for group in image)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("after", [False, True])
def test_a_video_and_an_image_in_the_tower_equal_the_reference(after: bool) -> None:
    """The tower alone on a video's 2 frame groups (one grid row each, as GLM's `get_video_features` hands them to the
    tower) and an image, merging between attention and MLP or after the block; its `last_hidden_state` stays the
    downsample conv's output (one row per LLM token)."""
    model = tiny_glm4v(seed=4)
    grid = torch.tensor([[1, 6, 4], [1, 6, 4], [1, 4, 10]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(4))
    pooler, groups, rows = tome_packed_tower(model, pixels, grid, 3, after=after)
    point = "encoder.layer[*]" if after else "encoder.layer[*].attention"
    text = f"policy p {{ stage {point} {{ merge bipartite(r=3, proportional=true) of vision by keys }} }}"
    policyc.compile(model, check_source(text)[0])
    try:
        with torch.no_grad():
            output = model.model.visual(pixels, grid_thw=grid)
        images = model.policyc.images
        assert groups_by_image(images.merged_into, grid) == groups and images.encoder_rows.tolist() == rows
        torch.testing.assert_close(output.pooler_output, pooler, rtol=0, atol=1e-5)
        assert output.last_hidden_state.shape == (pixels.shape[0] // 4, 64)
    finally:
        model.policyc.remove()


def test_tome_generates_and_batches_equal_single_runs() -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(tiny_glm4v(), "tome", {"r": 4}, inputs, qwen_single_row)


def test_tome_with_a_projector_stage() -> None:
    """Encoder merges and a projector.output drop compose: the LLM sees DivPrune's share of the merger's tokens."""
    text = """policy p {
      stage encoder.layer[*].attention { merge bipartite(r=3, proportional=true) of vision by keys }
      stage projector.output { keep diverse 50% of vision by hidden }
    }"""
    model = tiny_glm4v(moe=True)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=5)
    policyc.compile(model, check_source(text)[0])
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        images = model.policyc.images
        kept = images.kept if images.kept is not None else model.policyc.runtime.image_slots[0]
        assert images.merged_into is not None and int(kept.sum()) == 24  # half of 16 + 8 tokens, in each row
    finally:
        model.policyc.remove()


def test_tome_shrinks_the_encoders_flops_not_the_llms() -> None:
    report = assert_tome_shrinks_only_the_encoder(tiny_glm4v(), 4, "tiny-glm4v")
    assert report.image_tokens == 16


def test_remove_restores_the_model() -> None:
    model = tiny_glm4v()
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2)
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits
    tome_forward(model, inputs, 4)
    with torch.no_grad():
        assert torch.equal(model(**inputs, use_cache=False).logits, before)
