"""LLaVA-OneVision-1.5 (llava_onevision1_5): the adapter, the identity policy bit-exact at every generate() step,
FastV (tests/reference/fastv_embeds.py) and DivPrune before the LLM (tests/reference/before_llm.py: a shorter prompt
at 1-D positions 0..L'-1) against plain references, the standard library's LLM and decode policies with padded
batches equal to single runs, ToMe in the tower with a CLS row per frame against tests/reference/tome_packed.py,
prompts holding an image and videos, kept-token pictures, and `policyc compile` / `policyc bench` of a saved
directory."""

from __future__ import annotations

import pytest
import torch
import transformers

if not hasattr(transformers, "LlavaOnevision15ForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no LLaVA-OneVision-1.5 (llava_onevision1_5)",
                allow_module_level=True)

from family_checks import (
    LLM_POLICIES,
    assert_batch_equals_single_runs,
    assert_identity_is_bit_exact,
    assert_saved_directory_compiles,
    assert_tome_shrinks_only_the_encoder,
    tome_forward,
)
from generation import assert_one_compiled_decode_graph
from reference.before_llm import before_llm_generate
from reference.divprune import divprune_keep
from reference.fastv_embeds import fastv_generate_from_inputs
from reference.tome_packed import tome_packed_tower
from reference.tome_qwen import groups_by_image, with_pooler_output
from tiny_llava_onevision1_5 import make_ov15_inputs, ov15_single_row, tiny_llava_onevision1_5
from tiny_models import QWEN_IMAGE_ID, QWEN_VIDEO_ID

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.llava_onevision1_5 import OneVision15Adapter

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens


def _assert_kept_image_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    for row, expected_row in enumerate(expected):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[image[row, kept]], expected_row)


def test_the_adapter_finds_the_parts() -> None:
    model = tiny_llava_onevision1_5()
    adapter = adapt(model)
    tower = model.model.visual
    assert isinstance(adapter, OneVision15Adapter) and adapter.family == "llava_onevision1_5"
    assert adapter.frame_cls and adapter.unmerge_after_blocks and adapter.temporal_patch_size == 1
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert adapter.vision_layers is tower.blocks and adapter.projector is tower.merger
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("1d", False, None, None)
    assert adapter.visual_ids == (QWEN_IMAGE_ID, QWEN_VIDEO_ID) and adapter.encoder_patches_per_token == 4
    assert adapter.image_sizes(make_ov15_inputs(grids=GRIDS)["input_ids"][0]) == [16, 8]
    assert adapter.encoder_tokens(16) == 65  # 64 patches and the frame's CLS row
    assert "family llava_onevision1_5" in adapter.describe() and "+ one CLS row per frame" in adapter.describe()


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_llava_onevision1_5()
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (64, 3 * 4 * 4) and "mm_token_type_ids" not in inputs
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(batch: int) -> None:
    assert_identity_is_bit_exact(tiny_llava_onevision1_5(), make_ov15_inputs(batch=batch, grids=GRIDS, pad_left=2))


@pytest.mark.parametrize(("seed", "layer", "keep"), [(0, 1, 12), (1, 0, 5), (2, 2, 20)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_reference(seed: int, layer: int, keep: int, batch: int) -> None:
    model = tiny_llava_onevision1_5(seed=seed)
    inputs = make_ov15_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_generate_from_inputs(model, inputs, (QWEN_IMAGE_ID,), layer=layer,
                                                                keep=keep, max_new_tokens=5)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("seed", "ratio"), [(0, 25), (1, 50)])
@pytest.mark.parametrize("batch", [1, 2])
def test_divprune_equals_the_shorter_prompt_reference(seed: int, ratio: int, batch: int) -> None:
    """DivPrune at projector.output: the LLM sees a shorter prompt, positions 0..L'-1 (1-D RoPE: the gap closes)."""
    model = tiny_llava_onevision1_5(seed=seed)
    inputs = make_ov15_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = before_llm_generate(
        model, inputs, QWEN_IMAGE_ID, [[16, 8]] * batch,
        lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=5)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


STDLIB = [*LLM_POLICIES, ("divprune", {"ratio": "50%"}, True), ("random_drop", {"ratio": "50%"}, True),
          ("tome", {"r": 4}, False), ("streamingllm", {"sinks": 4, "window": 16}, False)]  # 1-D RoPE: pos-shift
DEPTH = {"sparsevlm": 16, "pyramiddrop": 8, "pyramiddrop_snapkv": 8}  # their fixed or depth / 4 - 1 layers exist


@pytest.mark.parametrize(("policy", "params", "drops"), STDLIB, ids=[p[0] for p in STDLIB])
def test_stdlib_policies_generate_and_batches_equal_single_runs(policy: str, params: dict, drops: bool) -> None:
    model = tiny_llava_onevision1_5(num_llm_layers=DEPTH.get(policy, 4))
    inputs = make_ov15_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(model, policy, params, inputs, ov15_single_row, drops=drops)


def test_the_tome_reference_without_merges_is_the_model() -> None:
    """With r=0 the reference's blocks (each frame led by its CLS row), CLS strip and merger give the model's logits."""
    model = tiny_llava_onevision1_5(seed=1)
    inputs = make_ov15_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    pooler, groups, rows = tome_packed_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], 0)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(with_pooler_output(model, inputs, pooler), expected, rtol=0, atol=1e-5)
    assert all(len(group) == 1 for image in groups for group in image) and rows[0] == [65, 65]  # with CLS


@pytest.mark.parametrize(("seed", "r"), [(0, 1), (1, 3), (2, 40)])
@pytest.mark.parametrize("batch", [1, 2])
def test_tome_with_a_cls_per_frame_equals_the_reference(seed: int, r: int, batch: int) -> None:
    """ToMe per frame, the CLS row attending but never merging: the same groups, rows per block and logits."""
    model = tiny_llava_onevision1_5(seed=seed)
    inputs = make_ov15_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    pooler, groups, rows = tome_packed_tower(model, inputs["pixel_values"], inputs["image_grid_thw"], r)
    logits, images = tome_forward(model, inputs, r)
    assert groups_by_image(images.merged_into, inputs["image_grid_thw"]) == groups
    assert images.encoder_rows.tolist() == rows and any(len(g) > 1 for image in groups for g in image)
    torch.testing.assert_close(logits, with_pooler_output(model, inputs, pooler), rtol=0, atol=1e-5)


def test_tome_on_a_video_in_the_tower_equals_the_reference() -> None:
    """Two frames, each with its own CLS row, merging after the block (`encoder.layer[*]`)."""
    model = tiny_llava_onevision1_5(seed=4)
    grid = torch.tensor([[2, 6, 4], [1, 4, 10]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 4 * 4, generator=torch.Generator().manual_seed(4))
    pooler, groups, rows = tome_packed_tower(model, pixels, grid, 3, after=True)
    text = "policy p { stage encoder.layer[*] { merge bipartite(r=3, proportional=true) of vision by keys } }"
    policyc.compile(model, check_source(text)[0])
    try:
        with torch.no_grad():
            output = model.model.visual(pixels, grid_thw=grid)
        images = model.policyc.images
        assert groups_by_image(images.merged_into, grid) == groups and images.encoder_rows.tolist() == rows
        torch.testing.assert_close(output.pooler_output, pooler, rtol=0, atol=1e-5)
        assert output.last_hidden_state.shape[0] == pixels.shape[0]  # every patch, the CLS rows stripped
    finally:
        model.policyc.remove()


def test_tome_shrinks_the_encoders_flops_not_the_llms() -> None:
    assert assert_tome_shrinks_only_the_encoder(tiny_llava_onevision1_5(), 4, "tiny-ov15").image_tokens == 16


@pytest.mark.parametrize("policy", ["visionzip", "fastervlm"])
def test_cls_policies_fail_naming_the_per_frame_cls_and_substitutes(policy: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_llava_onevision1_5(), policy)
    text = str(error.value)
    assert "CLS token of LLaVA-OneVision-1.5's tower (one per frame) never reaches the LLM" in text
    assert "visiondrop_llm" in text and f"{policy}.tokpol:" in text


def test_kept_token_pictures_render(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from policyc.report import measure
    from policyc.show_tokens import draw_kept_tokens

    model = tiny_llava_onevision1_5()
    adapter = adapt(model)
    inputs = adapter.sample_inputs()
    [image] = adapter.image_layouts(inputs)
    [view] = image.views
    assert adapter.draws_tokens and view.grid == (4, 4)
    assert torch.equal(adapter.patchify(view.pixels), inputs["pixel_values"])
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, inputs, "tiny-ov15")
    assert report.image_tokens == 16 and report.kept[0].after == 4 and len(report.kept[0].kept_patches) == 4
    assert draw_kept_tokens(tmp_path / "kept.png", [image], report.kept).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_llava_onevision1_5(), tmp_path)


def test_bench_of_a_saved_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policyc bench DIR pyramiddrop` on a saved tiny OV-1.5: the unmodified, policy and ideal rows run."""
    import json

    from click.testing import CliRunner

    from policyc.cli import main

    tiny_llava_onevision1_5(seed=2).save_pretrained(tmp_path / "ov15")
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "ov15"), "pyramiddrop", "--batch", "2", "--gen-len",
                                       "3", "--repeats", "1", "--warmup", "0", "--prompt-len", "8", "--dtype",
                                       "float32", "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["policy"]["image_tokens"] < rows["unmodified"]["image_tokens"]
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"]
    assert rows["policy"]["tokens_per_layer"][1] < rows["policy"]["tokens_per_layer"][0]
    assert rows["ideal"]["ttft_s"] > 0 and rows["unmodified"]["ttft_s"] > 0


@pytest.mark.parametrize("policy", ["fastv", "divprune", "h2o"])
def test_a_static_cache_equals_the_dynamic_one_and_decodes_in_one_compiled_graph(policy: str) -> None:
    model = tiny_llava_onevision1_5(seed=1)
    inputs = make_ov15_inputs(batch=2, grids=GRIDS, pad_left=2)
    policyc.compile(model, policy)
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static"),
                       dynamic)
    assert_one_compiled_decode_graph(model, inputs, dynamic, max_new_tokens=5)


VIDEOS = ((2, 8, 8), (2, 4, 8))  # two videos per row after an image: 2 frames of 16 tokens, 2 of 8 (one run each)


def test_identity_is_bit_exact_with_an_image_and_videos() -> None:
    """Each video frame gets its own CLS row in the tower; images and videos come in two tower forwards."""
    inputs = make_ov15_inputs(batch=2, grids=((4, 8),), pad_left=2, seed=1, videos=VIDEOS)
    assert_identity_is_bit_exact(tiny_llava_onevision1_5(seed=1), inputs)


def test_divprune_with_an_image_and_videos_equals_the_shorter_prompt_reference() -> None:
    """DivPrune keeps its share of the image and of each video (all its frames together)."""
    model = tiny_llava_onevision1_5(seed=2)
    inputs = make_ov15_inputs(batch=2, grids=((4, 8),), pad_left=2, seed=2, videos=VIDEOS)
    expected_tokens, expected_kept = before_llm_generate(
        model, inputs, (QWEN_IMAGE_ID, QWEN_VIDEO_ID), [[8, 32, 16]] * 2,
        lambda f: divprune_keep(f[None], int(f.shape[0] * 0.5))[0], max_new_tokens=4)
    policyc.compile(model, "divprune", ratio="50%")
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    visual = (inputs["input_ids"] == QWEN_IMAGE_ID) | (inputs["input_ids"] == QWEN_VIDEO_ID)
    for row, expected_row in enumerate(expected_kept):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[visual[row, kept]], expected_row)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("policy", "params"), [("fastv", {"layer": 1, "ratio": "30%"}), ("tome", {"r": 3}),
                                                ("holitom_temporal", {})])
def test_padded_batches_with_an_image_and_videos_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_ov15_inputs(batch=2, grids=((4, 8),), pad_left=2, seed=6, videos=VIDEOS)
    assert_batch_equals_single_runs(tiny_llava_onevision1_5(seed=6), policy, params, inputs, ov15_single_row,
                                    drops=policy == "fastv")
