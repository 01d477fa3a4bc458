"""Qwen3-VL and Qwen3-VL-MoE: the adapter, the identity policy bit-exact at every generate() step, DeepStack features
following the kept rows (FastV against a plain reference that drops rows and their DeepStack features, DivPrune at
projector.output against a shorter prompt), with images and videos, and padded batches equal to single runs (SparseVLM's
recycling at layer 2, a DeepStack layer, included). ToMe in the tower: tests/test_qwen3_vl_encoder.py; merges that
fold the DeepStack features: tests/test_qwen3_vl_merges.py."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    LLM_POLICIES,
    assert_batch_equals_single_runs,
    assert_identity_is_bit_exact,
    assert_saved_directory_compiles,
)
from generation import assert_one_compiled_decode_graph
from reference.divprune import divprune_keep
from reference.fastv_deepstack import fastv_deepstack_generate, projector_deepstack_generate
from reference.fastv_mrope import mrope_positions
from tiny_models import QWEN_IMAGE_ID, QWEN_VIDEO_ID, make_qwen_inputs, qwen_single_row
from tiny_qwen3_vl import make_qwen3_video_inputs, tiny_qwen3_vl

import policyc
from policyc.errors import PolicyError
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


def _assert_divprune_equals_the_reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor], ratio: int,
                                          max_new_tokens: int) -> None:
    """DivPrune at `ratio`% keeps the reference's tokens (each with its own DeepStack features) and generates its
    tokens."""
    expected_tokens, expected_kept = projector_deepstack_generate(
        model, inputs, lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0],
        max_new_tokens=max_new_tokens)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1]:], expected_tokens)


def _assert_kept_image_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    """Each row's visual tokens (images and videos) alive after prefill are the reference's, [n] indices into that
    row."""
    image = (inputs["input_ids"] == QWEN_IMAGE_ID) | (inputs["input_ids"] == QWEN_VIDEO_ID)
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
    _assert_divprune_equals_the_reference(model, make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed),
                                          ratio, max_new_tokens=5)


@pytest.mark.parametrize(("policy", "params"), [
    ("divprune", {"ratio": "50%"}), ("random_drop", {"ratio": "50%"}), ("fastv", {"layer": 1, "ratio": "30%"})])
def test_padded_batches_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=3)
    assert_batch_equals_single_runs(tiny_qwen3_vl(), policy, params, inputs, qwen_single_row, drops=True)


@pytest.fixture(scope="module")
def deep_models() -> dict[bool, torch.nn.Module]:
    """32-layer LLMs, so the standard library's layers (PyramidDrop's 7, 15, 23) exist past the DeepStack ones."""
    return {moe: tiny_qwen3_vl(num_llm_layers=32, moe=moe) for moe in MOE}


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
@pytest.mark.parametrize(("policy", "params", "drops"), LLM_POLICIES, ids=[p[0] for p in LLM_POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(
        deep_models: dict[bool, torch.nn.Module], moe: bool, policy: str, params: dict, drops: bool) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(deep_models[moe], policy, params, inputs, qwen_single_row, drops=drops)


def test_pyramiddrop_drops_in_the_deepstack_layers_of_a_shallow_model() -> None:
    """On 4 layers PyramidDrop's first stage is layer 0, a DeepStack layer: a padded batch equals single runs."""
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=2)
    assert_batch_equals_single_runs(tiny_qwen3_vl(), "pyramiddrop", {}, inputs, qwen_single_row, drops=True)


@pytest.mark.parametrize("policy", ["fastv", "divprune", "pyramiddrop", "h2o"])
def test_a_static_cache_equals_the_dynamic_one_and_decodes_in_one_compiled_graph(policy: str) -> None:
    model = tiny_qwen3_vl(seed=1)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2)
    policyc.compile(model, policy)
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static"),
                       dynamic)
    assert_one_compiled_decode_graph(model, inputs, dynamic, max_new_tokens=5)


def test_kept_token_pictures_render(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from policyc.report import measure
    from policyc.show_tokens import draw_kept_tokens

    model = tiny_qwen3_vl()
    adapter = adapt(model)
    inputs = adapter.sample_inputs()
    [image] = adapter.image_layouts(inputs)
    assert adapter.draws_tokens and image.views[0].grid == (4, 4)
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, inputs, "tiny-qwen3-vl")
    assert report.image_tokens == 16 and report.kept[0].after == 4 and len(report.kept[0].kept_patches) == 4
    assert report.flops_after.llm < report.flops_before.llm
    assert draw_kept_tokens(tmp_path / "kept.png", [image], report.kept).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_qwen3_vl_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_qwen3_vl(), tmp_path)


def test_bench_of_a_saved_qwen3_vl_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policyc bench DIR pyramiddrop` on a saved tiny Qwen3-VL: its first stage is layer 0, a DeepStack layer, so the
    ideal row's shorter layers take the DeepStack features of the rows they keep; no reference row yet (the Qwen2-VL
    one has no DeepStack)."""
    import json

    from click.testing import CliRunner

    from policyc.cli import main

    tiny_qwen3_vl(seed=2).save_pretrained(tmp_path / "qwen3")
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "qwen3"), "pyramiddrop", "--batch", "2", "--gen-len",
                                       "3", "--repeats", "1", "--warmup", "0", "--prompt-len", "8", "--dtype",
                                       "float32", "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["unmodified"]["image_tokens"] == 576 and rows["policy"]["image_tokens"] < 576
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"]
    assert rows["policy"]["tokens_per_layer"][1] < rows["policy"]["tokens_per_layer"][0]  # dropped at layer 0
    assert rows["ideal"]["ttft_s"] > 0 and "no reference implementation of 'pyramiddrop' for qwen3_vl" in \
        rows["reference"]["note"]


def test_the_released_8b_shape_on_the_meta_device() -> None:
    """`policyc bench --shapes qwen3-vl-8b`: Qwen3-VL-8B-Instruct's architecture, its released parameter count."""
    from policyc.bench import Settings, synthetic_inputs
    from policyc.models.shapes import build_shape

    model = build_shape("qwen3-vl-8b", "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_767_123_696
    adapter = adapt(model)
    assert (len(adapter.decoder_layers), adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (36, 32, 8, 128)
    assert len(adapter.vision_layers) == 27 and adapter.deepstack_layers == 3 and adapter.rope == "mrope"
    inputs = synthetic_inputs(adapter, Settings(batch=2, images=1))
    assert inputs["input_ids"].shape == (2, 64 + 578) and inputs["pixel_values"].shape == (2 * 2304, 3 * 2 * 16 * 16)


@pytest.mark.parametrize(("policy", "expected"), [
    ("streamingllm", "heavy_hitter (H2O) or snapkv"),  # 1-D pos-shift on M-RoPE
    ("pool", "qwen3_vl's projector stages do not have yet"), ("grid", "qwen3_vl's projector stages do not have yet"),
    ("mmtok", "qwen3_vl's projector stages do not have yet"),
    ("fastervlm", "has no CLS token"),
])
def test_what_does_not_bind_fails_at_compile_time(policy: str, expected: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen3_vl(), policy)
    assert expected in str(error.value) and f"{policy}.tokpol:" in str(error.value)


@pytest.mark.parametrize("backend", ["inductor", "fx"])
def test_the_graph_backends_refuse_mrope(backend: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen3_vl(), "fastv", backend=backend)
    assert "uses M-RoPE" in str(error.value) and "fastv.tokpol:" in str(error.value)


VIDEOS = ((2, 8, 8), (2, 4, 8))  # two videos per row: 2 frame groups of 16 tokens, 2 of 8, each group its own run


def test_identity_is_bit_exact_with_an_image_and_videos() -> None:
    """A prompt holding an image and two videos (DeepStack interleaves their features by position)."""
    inputs = make_qwen3_video_inputs(batch=2, videos=VIDEOS, images=((4, 8),), pad_left=2, seed=1)
    assert_identity_is_bit_exact(tiny_qwen3_vl(seed=1), inputs)


@pytest.mark.parametrize(("policy", "params"), [
    ("fastv", {"layer": 1, "ratio": "30%"}), ("divprune", {"ratio": "50%"}), ("pyramiddrop", {})])
def test_padded_batches_with_an_image_and_videos_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_qwen3_video_inputs(batch=2, videos=VIDEOS, images=((4, 8),), pad_left=2, seed=6)
    assert_batch_equals_single_runs(tiny_qwen3_vl(seed=6), policy, params, inputs, qwen_single_row, drops=True)


def test_the_reference_positions_of_videos_match_the_models_own() -> None:
    """Each frame group of a video is its own run, placed as a one-frame image after its timestamp token."""
    model = tiny_qwen3_vl()
    inputs = make_qwen3_video_inputs(videos=VIDEOS, images=((4, 8),))
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             video_grid_thw=inputs["video_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    ids = inputs["input_ids"][0]
    visual_as_image = torch.where(ids == QWEN_VIDEO_ID, QWEN_IMAGE_ID, ids)
    grids = [(4, 8), (8, 8), (8, 8), (4, 8), (4, 8)]  # the image, then each video's frame groups
    assert torch.equal(mrope_positions(visual_as_image, QWEN_IMAGE_ID, grids, 2), expected[:, 0])


@pytest.mark.parametrize(("seed", "layer", "keep"), [(0, 0, 20), (1, 1, 30), (2, 2, 12)])
def test_fastv_with_an_image_and_videos_equals_the_deepstack_reference(seed: int, layer: int, keep: int) -> None:
    model = tiny_qwen3_vl(seed=seed)
    inputs = make_qwen3_video_inputs(batch=2, videos=VIDEOS, images=((4, 8),), pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_deepstack_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=4)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("seed", "ratio"), [(0, 25), (1, 50)])
def test_divprune_with_an_image_and_videos_equals_the_shorter_prompt_reference(seed: int, ratio: int) -> None:
    """DivPrune keeps its share of the image and of each video (all its frame groups together)."""
    inputs = make_qwen3_video_inputs(batch=2, videos=VIDEOS, images=((4, 8),), pad_left=2, seed=seed)
    _assert_divprune_equals_the_reference(tiny_qwen3_vl(seed=seed), inputs, ratio, max_new_tokens=4)


def test_moe_flops_count_the_experts_each_token_runs() -> None:
    """The compile report's LLM FLOPs on Qwen3-VL-MoE: attention, the router and `num_experts_per_tok` of the fused
    experts per token (their 3-D weights are no nn.Linear), not every expert, not none."""
    from policyc.report import prefill_flops

    model = tiny_qwen3_vl(moe=True)
    adapter = adapt(model)
    text = model.config.text_config
    hidden, heads, kv, head_dim = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    expert = 3 * hidden * text.moe_intermediate_size  # gate, up and down projections
    per_token = attention + text.num_experts * hidden + text.num_experts_per_tok * expert
    expected = sum(2 * n * per_token + 4 * n * n * heads * head_dim for n in (30, 30, 20, 20))
    assert prefill_flops(adapter, [30, 30, 20, 20], images=[16]).llm == expected
