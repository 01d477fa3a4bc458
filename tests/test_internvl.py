"""InternVL: the adapter, the identity policy bit-exact at every generate() step, FastV against the plain
reference (tests/reference/fastv.py: its LLM is causal with 1-D RoPE, as LLaVA's, so the LLaVA reference runs on it
unchanged), the standard library's LLM and decode policies end to end with padded batches equal to single runs, ToMe
in the encoder against an unmerging reference (tests/reference/tome_unmerge.py), and clear errors for what does not
bind yet."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    LLM_POLICIES,
    assert_batch_equals_single_runs,
    assert_identity_is_bit_exact,
    assert_saved_directory_compiles,
    assert_tome_shrinks_only_the_encoder,
    tome_forward,
)
from reference.fastv import fastv_generate
from reference.tome_unmerge import groups_of, tome_tower, with_tower_output
from tiny_internvl import INTERNVL_IMAGE_ID, TILE_TOKENS, make_internvl_inputs, single_internvl, tiny_internvl

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.report import measure

TILES = (2, 1)  # two images per row: 2 tiles (32 tokens) and 1 tile (16 tokens)


def test_the_adapter_finds_the_parts() -> None:
    model = tiny_internvl()
    adapter = adapt(model)
    assert adapter.family == "internvl"
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert adapter.vision_layers is model.model.vision_tower.encoder.layer
    assert adapter.projector is model.model.multi_modal_projector
    assert (adapter.has_cls, adapter.feature_start, adapter.keeps_cls_in_features) == (True, 1, False)
    assert (adapter.tokens_per_image, adapter.patch_grid, adapter.encoder_patches_per_token) == (16, (8, 8), 4)
    assert adapter.visual_ids == (INTERNVL_IMAGE_ID,) and adapter.rope == "1d"
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.image_sizes(make_internvl_inputs(tiles=TILES)["input_ids"][0]) == [TILE_TOKENS] * 3  # per tile


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_internvl()
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == INTERNVL_IMAGE_ID).sum()) == TILE_TOKENS
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(batch: int) -> None:
    assert_identity_is_bit_exact(tiny_internvl(), make_internvl_inputs(batch=batch, tiles=TILES, pad_left=2))


@pytest.mark.parametrize(("seed", "layer", "keep"), [(0, 1, 12), (1, 0, 5), (2, 2, 30)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_reference(seed: int, layer: int, keep: int, batch: int) -> None:
    model = tiny_internvl(seed=seed)
    inputs = make_internvl_inputs(batch=batch, tiles=TILES, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_generate(model, inputs["input_ids"], inputs["attention_mask"],
                                                    inputs["pixel_values"], layer=layer, keep=keep, max_new_tokens=5)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    try:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        image = inputs["input_ids"] == INTERNVL_IMAGE_ID
        for row in range(batch):
            kept = model.policyc.kept_positions[row]
            assert torch.equal(kept[image[row, kept]], expected_kept[row])
        assert torch.equal(tokens, expected_tokens)
    finally:
        model.policyc.remove()


@pytest.fixture(scope="module")
def deep_model() -> torch.nn.Module:
    """A 32-layer LLM, so the standard library's layer indices (PyramidDrop's 7, 15, 23) exist."""
    return tiny_internvl(num_llm_layers=32)


@pytest.mark.parametrize(("policy", "params", "drops"), LLM_POLICIES, ids=[p[0] for p in LLM_POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(
        deep_model: torch.nn.Module, policy: str, params: dict, drops: bool) -> None:
    inputs = make_internvl_inputs(batch=2, tiles=TILES, pad_left=2, seed=7)
    assert_batch_equals_single_runs(deep_model, policy, params, inputs, single_internvl, drops=drops)


@pytest.mark.parametrize(("r", "batch", "qk_norm"), [(4, 1, False), (8, 2, False), (40, 2, False), (8, 2, True)])
def test_tome_equals_the_unmerge_reference(r: int, batch: int, qk_norm: bool) -> None:
    """ToMe per tile in InternViT (merges between attention and MLP, proportional attention, layer scales; never the
    CLS token), unmerged at the tower's output: the same merged groups and logits as
    tests/reference/tome_unmerge.py. r=40 merges every pair it can; qk_norm: keys normalised before matching."""
    model = tiny_internvl(seed=r, qk_norm=qk_norm)
    inputs = make_internvl_inputs(batch=batch, tiles=TILES, pad_left=2, seed=r)
    hidden, groups = tome_tower(model, inputs["pixel_values"], r)
    expected = with_tower_output(model, inputs, hidden)
    logits, images = tome_forward(model, inputs, r)
    assert groups_of(images.merged_into) == groups and all(g[0] == [0] for g in groups)  # CLS alone
    assert images.encoder_rows[:, 0].eq(65).all() and images.encoder_rows[:, 1].eq(65 - min(r, 32)).all()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_tome_generates_and_batches_equal_single_runs(deep_model: torch.nn.Module) -> None:
    inputs = make_internvl_inputs(batch=2, tiles=TILES, pad_left=2, seed=7)
    assert_batch_equals_single_runs(deep_model, "tome", {"r": 8}, inputs, single_internvl)


def test_tome_shrinks_the_encoders_flops_not_the_llms() -> None:
    model = tiny_internvl()
    report = assert_tome_shrinks_only_the_encoder(model, 16, "tiny-internvl")
    assert report.image_tokens == TILE_TOKENS


@pytest.mark.parametrize(("policy", "reason", "hint"), [
    ("visionzip", "removes tokens, but internvl's connector needs every patch", "at projector.output (e.g. divprune)"),
    ("fastervlm", "removes tokens, but internvl's connector needs every patch", "or in the LLM (e.g. fastv)"),
    ("visiondrop", "removes tokens, but internvl's connector needs every patch", "or in the LLM (e.g. fastv)"),
    ("mustdrop", "`protect` in encoder stage encoder.layer[-1] would carry across internvl's connector",
     "protect tokens in the stage that drops them"),
])
def test_encoder_drops_fail_at_compile_time(deep_model: torch.nn.Module, policy: str, reason: str, hint: str) -> None:
    """What the connector cannot take (drops in the encoder, protection carried across it) fails at its line."""
    with pytest.raises(PolicyError) as error:
        policyc.compile(deep_model, policy)
    text = str(error.value)
    assert reason in text and hint in text and f"{policy}.tokpol:" in text


def test_encoder_stages_need_the_last_layers_features() -> None:
    model = tiny_internvl()
    model.config.vision_feature_layer = -2
    with pytest.raises(PolicyError) as error:
        policyc.compile(model, "tome")
    assert "vision_feature_layer -1" in str(error.value) and "tome.tokpol:" in str(error.value)


def test_the_compile_report_measures_internvl() -> None:
    model = tiny_internvl()
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, adapt(model).sample_inputs(), "tiny-internvl")
    assert report.image_tokens == TILE_TOKENS and report.kept[0].after == 4
    assert report.flops_after.llm < report.flops_before.llm and report.flops_before.encoder > 0


def test_a_saved_internvl_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_internvl(), tmp_path)
