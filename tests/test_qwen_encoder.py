"""ToMe in Qwen2-VL's and Qwen2.5-VL's packed vision encoder (policyc/runtime/qwen_tower.py): merges per frame
(Qwen2-VL) or per window (Qwen2.5-VL), unmerged before the 2x2 merger, against the plain reference
tests/reference/tome_qwen.py; generate() with the standard library's tome.tokpol, padded batches equal to single
runs, the compile report's encoder FLOPs, and what still fails at compile time."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_batch_equals_single_runs, assert_tome_shrinks_only_the_encoder, tome_forward
from reference.tome_qwen import groups_by_image, tome_qwen_tower, with_pooler_output
from test_qwen2_vl import GRIDS
from tiny_models import make_qwen_inputs, qwen_single_row, tiny_qwen2_vl

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source

VERSIONS = ("2", "2.5")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_reference_without_merges_is_the_model(version: str) -> None:
    """With r=0 the reference's hand-written blocks (rotary, windows, eager attention) give the model's own logits:
    it computes what the tower computes."""
    model = tiny_qwen2_vl(version=version, seed=1)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    pooler, groups, rows = tome_qwen_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], 0)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(with_pooler_output(model, inputs, pooler), expected, rtol=0, atol=1e-5)
    assert all(len(group) == 1 for image in groups for group in image) and rows[0] == [64, 64]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("seed", "r"), [(0, 1), (1, 3), (2, 8), (3, 40)])
@pytest.mark.parametrize("batch", [1, 2])
def test_tome_equals_the_reference(version: str, seed: int, r: int, batch: int) -> None:
    """The same merged groups (per frame on Qwen2-VL, per window on Qwen2.5-VL), the same rows per block, and
    logits within 1e-5 of tests/reference/tome_qwen.py; r=40 merges every pair it can."""
    model = tiny_qwen2_vl(version=version, seed=seed)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    pooler, groups, rows = tome_qwen_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], r)
    expected = with_pooler_output(model, inputs, pooler)
    logits, images = tome_forward(model, inputs, r)
    assert groups_by_image(images.merged_into, inputs["image_grid_thw"]) == groups
    assert images.encoder_rows.tolist() == rows
    assert any(len(group) > 1 for image in groups for group in image)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("after", [False, True])
def test_a_video_and_an_image_in_the_tower_equal_the_reference(version: str, after: bool) -> None:
    """The tower alone on a 2-frame video (each frame its own attention span and merge sets) and an image, merging
    between attention and MLP (`encoder.layer[*].attention`) or after the block (`encoder.layer[*]`)."""
    model = tiny_qwen2_vl(version=version, seed=4)
    grid = torch.tensor([[2, 6, 4], [1, 4, 10]])  # Qwen2.5-VL: edge windows of 8 patches next to full ones of 16
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(4))
    pooler, groups, rows = tome_qwen_tower(model, pixels, grid, 3, after=after)
    point = "encoder.layer[*]" if after else "encoder.layer[*].attention"
    text = f"policy p {{ stage {point} {{ merge bipartite(r=3, proportional=true) of vision by keys }} }}"
    policyc.compile(model, check_source(text)[0])
    try:
        with torch.no_grad():
            output = model.model.visual(pixels, grid_thw=grid)
        images = model.policyc.images
        assert groups_by_image(images.merged_into, grid) == groups and images.encoder_rows.tolist() == rows
        torch.testing.assert_close(output.pooler_output, pooler, rtol=0, atol=1e-5)
        assert output.last_hidden_state.shape[0] == pixels.shape[0]  # unmerged: every patch
    finally:
        model.policyc.remove()


def test_merges_stay_inside_windows() -> None:
    """Qwen2.5-VL's window blocks attend within windows of 4x4 patches here: no merged group leaves its window."""
    model = tiny_qwen2_vl(version="2.5")
    inputs = make_qwen_inputs(grids=((8, 8),))
    _, images = tome_forward(model, inputs, 8)
    window = [p // 4 // 4 // 2 * 2 + p // 4 % 4 // 2 for p in range(64)]  # 2x2 groups of 2x2 patches per window
    assert all(window[p] == window[int(h)] for p, h in enumerate(images.merged_into))
    assert any(int(h) != p for p, h in enumerate(images.merged_into))


@pytest.mark.parametrize("version", VERSIONS)
def test_tome_generates_and_batches_equal_single_runs(version: str) -> None:
    """The standard library's tome.tokpol generates, and a left-padded batch of images of different sizes equals each
    row alone (each frame or window merges on its own)."""
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(tiny_qwen2_vl(version=version), "tome", {"r": 4}, inputs, qwen_single_row)


@pytest.mark.parametrize("version", VERSIONS)
def test_tome_with_a_projector_stage(version: str) -> None:
    """Encoder merges and a projector.output drop compose: the LLM sees DivPrune's share of the merger's tokens."""
    text = """policy p {
      stage encoder.layer[*].attention { merge bipartite(r=3, proportional=true) of vision by keys }
      stage projector.output { keep diverse 50% of vision by hidden }
    }"""
    model = tiny_qwen2_vl(version=version)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=5)
    policyc.compile(model, check_source(text)[0])
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        images = model.policyc.images
        kept = images.kept if images.kept is not None else model.policyc.runtime.image_slots[0]
        assert images.merged_into is not None and int(kept.sum()) == 24  # half of 16 + 8 tokens, in each row
    finally:
        model.policyc.remove()


@pytest.mark.parametrize("version", VERSIONS)
def test_tome_shrinks_the_encoders_flops_not_the_llms(version: str) -> None:
    report = assert_tome_shrinks_only_the_encoder(tiny_qwen2_vl(version=version), 4, f"tiny-qwen{version}")
    assert report.image_tokens == 16


def test_remove_restores_the_model() -> None:
    model = tiny_qwen2_vl(version="2.5")
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2)
    with torch.no_grad():
        before = model(**inputs, use_cache=False).logits
    tome_forward(model, inputs, 4)
    with torch.no_grad():
        assert torch.equal(model(**inputs, use_cache=False).logits, before)


@pytest.mark.parametrize("policy", ["visionzip", "fastervlm", "visiondrop", "mustdrop", "evit", "flowcut"])
def test_encoder_drops_of_the_standard_library_fail_at_compile_time(policy: str) -> None:
    """The standard library's encoder drops rank by the CLS token's attention, which Qwen's tower does not have."""
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen2_vl(version="2.5"), policy)
    text = str(error.value)
    assert "has no CLS token" in text and "attention(last -> vision) in an LLM stage" in text
    assert f"{policy}.tokpol:" in text


@pytest.mark.parametrize(("statement", "reason", "hint"), [
    ("drop top 8 of vision by key_norm", "`drop` in encoder stage encoder.layer[0] removes tokens, but qwen2_vl's "
     "connector needs every patch", "or drop after the connector: at projector.output (e.g. divprune)"),
    ("merge window(size=3, threshold=0.8) of vision by hidden", "qwen2_vl's packed encoder (images in one sequence, "
     "windows on Qwen2.5-VL) runs `merge bipartite ... by keys` (ToMe)", "of vision by keys (tome)"),
])
@pytest.mark.parametrize("version", VERSIONS)
def test_what_the_packed_encoder_cannot_run_fails_at_compile_time(version: str, statement: str, reason: str,
                                                                   hint: str) -> None:
    text = f"policy p {{\n  stage encoder.layer[0] {{\n    {statement}\n  }}\n}}"
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen2_vl(version=version), check_source(text, "p.tokpol")[0])
    assert reason in str(error.value) and hint in str(error.value) and "p.tokpol:3:5" in str(error.value)
