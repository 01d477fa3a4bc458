"""ToMe in Qwen3-VL's packed vision tower: unmerged before the 2x2 merger and before each DeepStack merger, against the
plain per-frame reference with DeepStack levels (tests/reference/tome_qwen.py `tome_qwen3_tower`); batches equal
single runs; the compile report's encoder FLOPs shrink, the LLM's do not."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_batch_equals_single_runs, assert_tome_shrinks_only_the_encoder, tome_forward
from reference.tome_qwen import groups_by_image, tome_qwen3_tower, with_pooler_output
from tiny_models import make_qwen_inputs, qwen_single_row
from tiny_qwen3_vl import tiny_qwen3_vl

import policyc

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens


def test_tome_unmerges_before_every_deepstack_merger() -> None:
    """ToMe in the tower: each DeepStack merger reads every patch (the tower's block order), a merged group's
    patches sharing its token's row, as the main merger does; merges only grow from level to level."""
    model = tiny_qwen3_vl()
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    policyc.compile(model, "tome", r=4)
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
               for m in model.model.visual.deepstack_merger_list]
    try:
        with torch.no_grad():
            model(**inputs)
        merged_into = model.policyc.images.merged_into
    finally:
        for handle in handles:
            handle.remove()
        model.policyc.remove()
    patches = inputs["pixel_values"].shape[0]
    assert [tuple(x.shape) for x in seen] == [(patches, 32)] * 3
    distinct = [len(torch.unique(x, dim=0)) for x in seen]
    assert distinct[0] > distinct[1] > distinct[2] > len(torch.unique(merged_into))  # block 3 merges too
    for level in seen:  # rows equal at a level belong to one final token
        _, group = torch.unique(level, dim=0, return_inverse=True)
        for g in group.unique():
            assert len(merged_into[group == g].unique()) == 1


def test_tome_generates_and_batches_equal_single_runs() -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(tiny_qwen3_vl(), "tome", {"r": 4}, inputs, qwen_single_row)


def test_tome_shrinks_the_encoders_flops_not_the_llms() -> None:
    assert assert_tome_shrinks_only_the_encoder(tiny_qwen3_vl(), 4, "tiny-qwen3-vl").image_tokens == 16


def test_the_tome_reference_without_merges_is_the_model() -> None:
    """With r=0 the reference's hand-written blocks and DeepStack levels give the model's own logits."""
    model = tiny_qwen3_vl(seed=1)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    pooler, deepstack, groups, _ = tome_qwen3_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], 0)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(with_pooler_output(model, inputs, pooler, deepstack), expected, rtol=0, atol=1e-5)
    assert all(len(group) == 1 for image in groups for group in image)


@pytest.mark.parametrize(("seed", "r"), [(0, 1), (1, 3), (2, 8)])
@pytest.mark.parametrize("batch", [1, 2])
def test_tome_equals_the_reference(seed: int, r: int, batch: int) -> None:
    """ToMe in the Qwen3-VL tower against tests/reference/tome_qwen.py: the same merged groups and rows per block, and
    logits within 1e-5 of the unmodified model fed the reference's merger output and DeepStack levels (each merger
    on unmerged patches)."""
    model = tiny_qwen3_vl(seed=seed)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    pooler, deepstack, groups, rows = tome_qwen3_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], r)
    expected = with_pooler_output(model, inputs, pooler, deepstack)
    logits, images = tome_forward(model, inputs, r)
    assert groups_by_image(images.merged_into, inputs["image_grid_thw"]) == groups
    assert images.encoder_rows.tolist() == rows
    assert any(len(group) > 1 for image in groups for group in image)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    stale = with_pooler_output(model, inputs, pooler)  # the DeepStack levels of merged rows matter
    assert (stale - expected).abs().max() > 1e-3
