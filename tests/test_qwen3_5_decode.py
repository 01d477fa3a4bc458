"""Qwen3.5 (hybrid Gated DeltaNet / full-attention LLM) beyond prefill drops: decode cache policies acting on the
full-attention layers only, static caches, the standard library's LLM policies (on a layout whose attention layers
are the ones they read, and PyramidDrop written for the released layout), ToMe in the tower, kept-token pictures and
the released 27B shape. Prefill drops against references: tests/test_qwen3_5.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from family_checks import LLM_POLICIES, assert_batch_equals_single_runs, assert_tome_shrinks_only_the_encoder
from generation import assert_one_compiled_decode_graph
from tiny_models import make_qwen_inputs, qwen_single_row
from tiny_qwen3_5 import FULL_LAYERS, pad_batch, tiny_qwen3_5
from transformers.cache_utils import LinearAttentionLayer

import policyc
from policyc.lang import check_source
from policyc.models import adapt
from policyc.runtime.cache_slots import SlotLayer

GRIDS = ((8, 8), (4, 8))
CACHE_POLICIES = [("h2o", {}), ("snapkv", {"window": 4, "capacity": 24})]


@pytest.mark.parametrize(("policy", "params"), CACHE_POLICIES, ids=[p for p, _ in CACHE_POLICIES])
def test_cache_policies_evict_from_the_full_attention_layers_only(policy: str, params: dict) -> None:
    """After generate(), each full-attention layer's KV cache is a slot layer holding fewer prompt tokens than the
    prompt; the DeltaNet layers keep their own fixed-size states; the plan says where the policy acts."""
    model = tiny_qwen3_5()
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    policyc.compile(model, policy, **params)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    layers = out.past_key_values.layers
    length = inputs["input_ids"].shape[1]
    for k, layer in enumerate(layers):
        if k in FULL_LAYERS:
            assert isinstance(layer, SlotLayer) and layer.positions.shape[-1] < length + 3
        else:
            assert isinstance(layer, LinearAttentionLayer)
    assert "cache policies act on the full-attention layers 3, 7 only" in model.policyc.plan.describe()


@pytest.mark.parametrize("policy", ["fastv", "divprune", "h2o"])
def test_a_static_cache_equals_the_dynamic_one_and_decodes_in_one_compiled_graph(policy: str) -> None:
    """The static cache's DeltaNet layers keep their states, its attention layers their slots (the slot count read
    from the first attention layer); transformers' compiled decode step runs in one graph, never recompiled."""
    model = tiny_qwen3_5(seed=1)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2)
    policyc.compile(model, policy, **({"layer": FULL_LAYERS[0]} if policy == "fastv" else {}))
    dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static"),
                       dynamic)
    assert_one_compiled_decode_graph(model, inputs, dynamic, max_new_tokens=4)


@pytest.fixture(scope="module")
def stdlib_layout() -> torch.nn.Module:
    """8 layers with full attention where the standard library reads attention on 8 layers (FastV's layer 1,
    PyramidDrop's and VisionDrop's `layer=next` of 1, 3 and 5), DeltaNet layers between."""
    return tiny_qwen3_5(full_layers=(1, 2, 4, 6))


STDLIB = [p for p in LLM_POLICIES if p[0] != "sparsevlm"]  # SparseVLM reads layer 15: tests/test_qwen3_5.py refuses


@pytest.mark.parametrize(("policy", "params", "drops"), STDLIB, ids=[p[0] for p in STDLIB])
def test_stdlib_policies_generate_and_batches_equal_single_runs(stdlib_layout: torch.nn.Module, policy: str,
                                                                params: dict, drops: bool) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(stdlib_layout, policy, params, inputs, qwen_single_row, steps=4, drops=drops)


@pytest.mark.parametrize(("policy", "params"), [("pyramiddrop_snapkv", {}),
                                               ("visiondrop_llm", {"early": 12, "middle": 8, "late": 4})])
def test_ragged_batches_with_stages_at_deltanet_layers_equal_single_runs(stdlib_layout: torch.nn.Module, policy: str,
                                                                        params: dict) -> None:
    """Rows keeping different counts (24 and 8 image tokens) through stages after DeltaNet layers 3 and 5 (drops and
    VisionDrop's merges there), a cache policy on the attention layers: each row generates what it generates alone."""
    rows = [make_qwen_inputs(grids=GRIDS, seed=4), make_qwen_inputs(grids=((4, 8),), text_before=5, seed=5)]
    assert_batch_equals_single_runs(stdlib_layout, policy, params, pad_batch(rows), lambda _inputs, row: rows[row],
                                    steps=4, drops=True)


PYRAMID = """policy pyramiddrop_qwen3_5 {
  param lam = 0.5
  stage llm.layer[depth / 4 - 1, depth / 2 - 1, 3 * depth / 4 - 1] {
    keep top geometric(lam) of vision by attention(last_instruction -> vision)
    positions compact
  }
}"""
VISIONZIP_STYLE = """policy visiondrop_qwen3_5 {
  stage llm.layer[depth / 4 - 1, depth / 2 - 1] {
    let salient = top [12, 8] of vision by attention(vision -> vision)
    let others = vision - salient
    let anchors = stride [4, 3] of others
    merge nearest of others - anchors into anchors by keys
    keep salient | anchors
  }
}"""


@pytest.mark.parametrize("text", [PYRAMID, VISIONZIP_STYLE], ids=["pyramiddrop", "visiondrop_llm"])
def test_llm_stages_written_for_the_released_layout(text: str) -> None:
    """PyramidDrop and VisionDrop's VisionZip-style stages at layers depth/4 - 1, ... (3 and 7 on 16 layers: full
    attention, as on the released models) reading that layer's own attention: a padded batch equals single runs."""
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=8)
    kept = assert_batch_equals_single_runs(tiny_qwen3_5(seed=3, num_llm_layers=16), check_source(text)[0], {},
                                           inputs, qwen_single_row, steps=4, drops=True)
    assert kept is not None


def test_tome_in_the_tower_shrinks_only_the_encoder_and_generates() -> None:
    """ToMe in the packed tower (Qwen3-VL's, unmerged before the 2x2 merger): fewer encoder FLOPs, the LLM's unchanged;
    a padded batch generates what its rows generate alone."""
    model = tiny_qwen3_5()
    report = assert_tome_shrinks_only_the_encoder(model, 3, "tiny-qwen3.5")
    assert report.image_tokens == 16
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=2)
    assert_batch_equals_single_runs(model, "tome", {"r": 3}, inputs, qwen_single_row, steps=4)


def test_kept_token_pictures_render(tmp_path: Any) -> None:
    from policyc.report import measure
    from policyc.show_tokens import draw_kept_tokens

    model = tiny_qwen3_5()
    adapter = adapt(model)
    inputs = adapter.sample_inputs()
    [image] = adapter.image_layouts(inputs)
    assert adapter.draws_tokens and image.views[0].grid == (4, 4)
    policyc.compile(model, "fastv", ratio="25%", layer=FULL_LAYERS[0])
    report = measure(model.policyc, inputs, "tiny-qwen3.5")
    assert report.image_tokens == 16 and report.kept[0].after == 4 and len(report.kept[0].kept_patches) == 4
    assert draw_kept_tokens(tmp_path / "kept.png", [image], report.kept).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_released_27b_shape_on_the_meta_device() -> None:
    """`--shapes qwen3.5-27b`: Qwen3.5-27B's architecture, the parameter count transformers builds for it, and the
    bench's synthetic prompts for it."""
    from policyc.models.shapes import build_shape

    model = build_shape("qwen3.5-27b", "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 27_356_728_560
    adapter = adapt(model)
    assert (len(adapter.decoder_layers), adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (64, 24, 4, 256)
    assert len(adapter.linear_layers) == 48 and adapter.layer_types[3::4] == ("full_attention",) * 16
    assert len(adapter.vision_layers) == 27 and adapter.deepstack_layers == 0 and adapter.rope == "mrope"
    from policyc.bench import Settings, synthetic_inputs

    inputs = synthetic_inputs(adapter, Settings(batch=2, images=1))
    assert inputs["input_ids"].shape == (2, 64 + 578) and inputs["pixel_values"].shape == (2 * 2304, 3 * 2 * 16 * 16)


def test_a_saved_qwen3_5_directory_compiles_from_the_command_line(tmp_path: Any) -> None:
    """`policyc compile DIR fastv -o OUT --param layer=3` (FastV at the first full-attention layer): the saved model
    loads, the compile report is printed and written (calibrated on the family's `sample_inputs`)."""
    from click.testing import CliRunner

    from policyc.cli import main

    tiny_qwen3_5().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "model"), "fastv", "-o", str(out), "--param",
                                       "layer=3"])
    assert result.exit_code == 0, result.output
    assert "tokens kept per stage" in result.output and (out / "report.json").is_file()


def test_prefill_flops_count_attention_scores_only_at_full_layers() -> None:
    """The compile report's analytic FLOPs: a Gated DeltaNet layer costs linearly in its rows (projections and the
    per-row state update), a full-attention layer adds the scores over every pair of rows. Doubling every layer's rows
    doubles the linear part, so the excess is the full layers' quadratic scores alone."""
    from policyc.report import prefill_flops

    adapter = adapt(tiny_qwen3_5())
    layers, full = len(adapter.decoder_layers), len(FULL_LAYERS)
    assert adapter.layer_types.count("full_attention") == full < layers
    n = 40
    single, double = (prefill_flops(adapter, [rows] * layers).llm for rows in (n, 2 * n))
    assert double - 2 * single == full * 4 * (4 * n * n - 2 * n * n) * adapter.num_heads * adapter.head_dim


@pytest.mark.parametrize(("seed", "r", "batch"), [(0, 0, 2), (1, 3, 1), (2, 8, 2)])
def test_tome_equals_the_reference(seed: int, r: int, batch: int) -> None:
    """ToMe in the Qwen3.5 tower (Qwen3-VL's, learned positions resampled per image, no DeepStack) against
    tests/reference/tome_qwen.py: the same merged groups and rows per block, and logits within 1e-5 of the unmodified
    model fed the reference's merger output (r=0: the reference is the model)."""
    from family_checks import tome_forward
    from reference.tome_qwen import groups_by_image, tome_qwen3_tower, with_pooler_output

    model = tiny_qwen3_5(seed=seed)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    pooler, deepstack, groups, rows = tome_qwen3_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], r)
    assert deepstack == []
    with torch.no_grad():
        expected = with_pooler_output(model, inputs, pooler)
        if r == 0:
            torch.testing.assert_close(expected, model(**inputs, use_cache=False).logits, rtol=0, atol=1e-5)
            return
    logits, images = tome_forward(model, inputs, r)
    assert groups_by_image(images.merged_into, inputs["image_grid_thw"]) == groups
    assert images.encoder_rows.tolist() == rows
    assert any(len(group) > 1 for image in groups for group in image)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
