"""Qwen3-VL and Qwen3-VL-MoE: the adapter, the identity policy bit-exact at every generate() step, DeepStack features
following the kept rows (FastV against a plain reference that drops rows and their DeepStack features, DivPrune at
projector.output against a shorter prompt), and padded batches equal to single runs."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_batch_equals_single_runs, assert_identity_is_bit_exact
from reference.divprune import divprune_keep
from reference.fastv_deepstack import fastv_deepstack_generate, projector_deepstack_generate
from reference.fastv_mrope import mrope_positions
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs, qwen_single_row
from tiny_qwen3_vl import tiny_qwen3_vl

import policyc
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.qwen3_vl import Qwen3VLAdapter

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens
MOE = (False, True)


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
def test_the_adapter_finds_the_parts(moe: bool) -> None:
    model = tiny_qwen3_vl(moe=moe)
    adapter = adapt(model)
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.family == "qwen3_vl"
    tower = model.model.visual
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert adapter.vision_layers is tower.blocks and adapter.projector is tower.merger
    assert adapter.deepstack_mergers == tuple(tower.deepstack_merger_list) and adapter.deepstack_layers == 3
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("mrope", False, None, None)
    assert adapter.visual_ids == (QWEN_IMAGE_ID, 122) and adapter.encoder_patches_per_token == 4
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.image_sizes(make_qwen_inputs(grids=GRIDS)["input_ids"][0]) == [16, 8]
    assert "family qwen3_vl" in adapter.describe() and "DeepStack after LLM layers 0..2" in adapter.describe()


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_qwen3_vl()
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (64, 3 * 2 * 4 * 4) and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int(inputs["mm_token_type_ids"].sum()) == 16 == int((inputs["input_ids"] == QWEN_IMAGE_ID).sum())
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(moe: bool, batch: int) -> None:
    assert_identity_is_bit_exact(tiny_qwen3_vl(moe=moe), make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2))


def _assert_kept_image_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    """Each row's image tokens alive after prefill are the reference's, [n] indices into that row."""
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    for row, expected_row in enumerate(expected):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[image[row, kept]], expected_row)


def test_the_reference_positions_match_the_models_own() -> None:
    model = tiny_qwen3_vl()
    inputs = make_qwen_inputs(grids=GRIDS)
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    grids = [(h, w) for _, h, w in inputs["image_grid_thw"].tolist()]
    assert torch.equal(mrope_positions(inputs["input_ids"][0], QWEN_IMAGE_ID, grids, 2), expected[:, 0])


def test_deepstack_features_change_the_output() -> None:
    """The tiny model's DeepStack features are large enough that losing or misplacing them shows in the logits
    (so the reference comparisons below would catch a drop that kept the wrong ones)."""
    model = tiny_qwen3_vl()
    inputs = make_qwen_inputs(grids=GRIDS)
    with torch.no_grad():
        logits = model(**inputs).logits
        model.model.language_model._deepstack_process = lambda hidden, mask, embeds: hidden
        try:
            without = model(**inputs).logits
        finally:
            del model.model.language_model._deepstack_process
    assert (logits - without).abs().max() > 0.1


@pytest.mark.parametrize(("moe", "seed", "layer", "keep"), [
    (False, 0, 0, 5), (False, 1, 1, 12), (False, 2, 2, 20), (False, 3, 3, 6), (True, 0, 1, 10), (True, 4, 0, 14)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_deepstack_reference(moe: bool, seed: int, layer: int, keep: int, batch: int) -> None:
    """FastV at a DeepStack layer (0..2) or after them: the reference drops the rows and their DeepStack features."""
    model = tiny_qwen3_vl(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_deepstack_generate(model, inputs, layer=layer, keep=keep,
                                                              max_new_tokens=5)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("moe", "seed", "ratio"), [(False, 0, 25), (False, 1, 50), (True, 2, 25)])
@pytest.mark.parametrize("batch", [1, 2])
def test_divprune_equals_the_shorter_prompt_reference(moe: bool, seed: int, ratio: int, batch: int) -> None:
    """DivPrune at projector.output: the LLM sees the kept tokens only, with their own DeepStack features, at their
    original M-RoPE positions."""
    model = tiny_qwen3_vl(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = projector_deepstack_generate(
        model, inputs, lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=5)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("policy", "params"), [
    ("divprune", {"ratio": "50%"}), ("random_drop", {"ratio": "50%"}), ("fastv", {"layer": 1, "ratio": "30%"})])
def test_padded_batches_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=3)
    assert_batch_equals_single_runs(tiny_qwen3_vl(), policy, params, inputs, qwen_single_row, drops=True)
