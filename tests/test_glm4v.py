"""GLM-4.1V and GLM-4.5V (glm4v, glm4v_moe): the adapter, the identity policy bit-exact at every generate() step,
FastV and DivPrune against the independent M-RoPE reference (tests/reference/fastv_mrope.py: GLM's positions are
Qwen2-VL's, checked against the model's own below), the standard library's LLM and decode policies end to end with
padded batches equal to single runs, videos (frame groups on the image token, told apart by `mm_token_type_ids`
only; transformers' GLM itself refuses a prompt holding an image and a video), kept-token pictures, `policyc
compile` and `policyc bench` of a saved directory. ToMe in the tower: tests/test_glm4v_encoder.py."""

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
from reference.fastv_mrope import fastv_mrope_generate, mrope_positions, projector_mrope_generate
from tiny_glm4v import make_glm_video_inputs, tiny_glm4v
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs, qwen_single_row

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.glm4v import Glm4vAdapter

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens
MOE = (False, True)


def _assert_kept_image_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    """Each row's image tokens alive after prefill are the reference's, [n] indices into that row."""
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    for row, expected_row in enumerate(expected):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[image[row, kept]], expected_row)


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
def test_the_adapter_finds_the_parts(moe: bool) -> None:
    model = tiny_glm4v(moe=moe)
    adapter = adapt(model)
    tower = model.model.visual
    assert isinstance(adapter, Glm4vAdapter) and adapter.family == "glm4v" and adapter.unmerge_after_blocks
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert adapter.vision_layers is tower.blocks and adapter.projector is tower.merger
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("mrope", False, None, None)
    assert adapter.visual_ids == (QWEN_IMAGE_ID, 122) and adapter.encoder_patches_per_token == 4
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.image_sizes(make_qwen_inputs(grids=GRIDS)["input_ids"][0]) == [16, 8]
    assert "family glm4v" in adapter.describe() and "downsample (2x2 Conv2d)" in adapter.describe()


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_glm4v()
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (64, 3 * 2 * 4 * 4) and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int(inputs["mm_token_type_ids"].sum()) == 16 == int((inputs["input_ids"] == QWEN_IMAGE_ID).sum())
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_the_reference_positions_match_the_models_own() -> None:
    """GLM's `get_rope_index` places text and images as Qwen2-VL's: the reference's positions are the model's."""
    model = tiny_glm4v()
    inputs = make_qwen_inputs(grids=GRIDS)
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    grids = [(h, w) for _, h, w in inputs["image_grid_thw"].tolist()]
    assert torch.equal(mrope_positions(inputs["input_ids"][0], QWEN_IMAGE_ID, grids, 2), expected[:, 0])


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(moe: bool, batch: int) -> None:
    assert_identity_is_bit_exact(tiny_glm4v(moe=moe), make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2))


@pytest.mark.parametrize(("moe", "seed", "layer", "keep"), [(False, 0, 1, 12), (False, 1, 0, 5), (True, 2, 2, 10)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_mrope_reference(moe: bool, seed: int, layer: int, keep: int, batch: int) -> None:
    model = tiny_glm4v(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_mrope_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=5)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("moe", "seed", "ratio"), [(False, 0, 25), (True, 1, 50)])
@pytest.mark.parametrize("batch", [1, 2])
def test_divprune_equals_the_mrope_reference(moe: bool, seed: int, ratio: int, batch: int) -> None:
    """DivPrune at projector.output (the merger's tokens, each image on its own): the reference's kept tokens, seen
    by the LLM at their original M-RoPE positions, and its generated tokens."""
    model = tiny_glm4v(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = projector_mrope_generate(
        model, inputs, lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=5)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


# GLM-4.5V (MoE) runs a share of them: the LLM stages do not look inside the MLP.
STDLIB = [(False, *p) for p in LLM_POLICIES] + [(True, *p) for p in LLM_POLICIES
                                                 if p[0] in ("fastv", "pyramiddrop", "h2o")]


@pytest.mark.parametrize(("moe", "policy", "params", "drops"), STDLIB,
                         ids=[f"{p[1]}-{'moe' if p[0] else 'dense'}" for p in STDLIB])
def test_stdlib_policies_generate_and_batches_equal_single_runs(moe: bool, policy: str, params: dict,
                                                                drops: bool) -> None:
    """8-layer LLMs (PyramidDrop at layers 1, 3, 5); SparseVLM's fixed layers 2, 6, 15 need 16."""
    model = tiny_glm4v(num_llm_layers=16 if policy == "sparsevlm" else 8, moe=moe)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(model, policy, params, inputs, qwen_single_row, drops=drops)


@pytest.mark.parametrize(("policy", "params"), [("divprune", {"ratio": "50%"}), ("random_drop", {"ratio": "50%"})])
def test_projector_drops_batches_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=3)
    assert_batch_equals_single_runs(tiny_glm4v(), policy, params, inputs, qwen_single_row, drops=True)


@pytest.mark.parametrize(("policy", "expected"), [
    ("streamingllm", "heavy_hitter (H2O) or snapkv"),  # 1-D pos-shift on M-RoPE
    ("pool", "glm4v's projector stages do not have yet"), ("mmtok", "glm4v's projector stages do not have yet"),
    ("fastervlm", "has no CLS token"),
])
def test_what_does_not_bind_fails_at_compile_time(policy: str, expected: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_glm4v(), policy)
    assert expected in str(error.value) and f"{policy}.tokpol:" in str(error.value)


def test_merge_temporal_fails_at_compile_time() -> None:
    """GLM's tower receives a video's frame groups as images of their own, so projector stages do not know frames."""
    text = "policy p { stage projector.output { merge temporal(threshold=0.9) of vision by hidden } }"
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_glm4v(), check_source(text)[0])
    assert "merge temporal needs the video frames of the model, which glm4v's projector" in str(error.value)


def test_kept_token_pictures_render(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from policyc.report import measure
    from policyc.show_tokens import draw_kept_tokens

    model = tiny_glm4v()
    adapter = adapt(model)
    inputs = adapter.sample_inputs()
    [image] = adapter.image_layouts(inputs)
    [view] = image.views
    assert adapter.draws_tokens and view.grid == (4, 4) and view.tokens == tuple(range(16))
    assert torch.equal(adapter.patchify(view.pixels), inputs["pixel_values"])
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, inputs, "tiny-glm4v")
    assert report.image_tokens == 16 and report.kept[0].after == 4 and len(report.kept[0].kept_patches) == 4
    assert report.flops_after.llm < report.flops_before.llm
    assert draw_kept_tokens(tmp_path / "kept.png", [image], report.kept).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_glm4v_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_glm4v(moe=True), tmp_path)


def test_bench_of_a_saved_glm4v_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policyc bench DIR pyramiddrop` on a saved tiny GLM-4.1V: the unmodified, policy and ideal rows run."""
    import json

    from click.testing import CliRunner

    from policyc.cli import main

    tiny_glm4v(seed=2).save_pretrained(tmp_path / "glm")
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "glm"), "pyramiddrop", "--batch", "2", "--gen-len",
                                       "3", "--repeats", "1", "--warmup", "0", "--prompt-len", "8", "--dtype",
                                       "float32", "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert rows["policy"]["image_tokens"] < rows["unmodified"]["image_tokens"]
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"]
    assert rows["policy"]["tokens_per_layer"][1] < rows["policy"]["tokens_per_layer"][0]
    assert rows["ideal"]["ttft_s"] > 0 and rows["unmodified"]["ttft_s"] > 0
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "glm"), "fastv", "--batch", "1", "--gen-len", "2",
                                       "--repeats", "1", "--warmup", "0", "--prompt-len", "8", "--dtype", "float32",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}  # GLM's positions are Qwen2-VL's
    assert rows["reference"]["note"].startswith("reference/fastv_mrope.py")
    assert rows["reference"]["image_tokens"] == rows["policy"]["image_tokens"] < rows["unmodified"]["image_tokens"]


VIDEOS = ((2, 8, 8), (2, 4, 8))  # two videos per row: 2 frame groups of 16 tokens, 2 of 8, each group its own run


def _videos_as_images(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same prompt with every frame group an image of its own (grid [1, h, w], type 1): what GLM's tower and
    `get_rope_index` make of a video, so the image-only reference applies."""
    grids = inputs["video_grid_thw"]
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "mm_token_type_ids": inputs["mm_token_type_ids"].clamp(max=1),
            "pixel_values": inputs["pixel_values_videos"],
            "image_grid_thw": torch.cat([torch.ones_like(grids[:, :1]), grids[:, 1:]], 1).repeat_interleave(
                grids[:, 0], dim=0)}


def test_the_reference_positions_of_videos_match_the_models_own() -> None:
    """Each frame group of a video (on the image token, type 2) is placed as a one-frame image."""
    model = tiny_glm4v()
    inputs = make_glm_video_inputs(videos=VIDEOS)
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             video_grid_thw=inputs["video_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    grids = [(8, 8), (8, 8), (4, 8), (4, 8)]
    assert torch.equal(mrope_positions(inputs["input_ids"][0], QWEN_IMAGE_ID, grids, 2), expected[:, 0])


def test_identity_is_bit_exact_with_videos() -> None:
    assert_identity_is_bit_exact(tiny_glm4v(seed=1), make_glm_video_inputs(batch=2, videos=VIDEOS, pad_left=2))


@pytest.mark.parametrize(("seed", "layer", "keep"), [(0, 1, 20), (1, 0, 30)])
def test_fastv_with_videos_equals_the_reference(seed: int, layer: int, keep: int) -> None:
    """FastV on a prompt of videos generates what the reference generates on its frame groups as images."""
    model = tiny_glm4v(seed=seed)
    inputs = make_glm_video_inputs(batch=2, videos=VIDEOS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_mrope_generate(model, _videos_as_images(inputs), layer=layer, keep=keep,
                                                          max_new_tokens=4)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("policy", "params"), [("divprune", {"ratio": "50%"}), ("pyramiddrop", {}),
                                               ("tome", {"r": 3})])
def test_padded_batches_with_videos_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_glm_video_inputs(batch=2, videos=VIDEOS, pad_left=2, seed=6)
    assert_batch_equals_single_runs(tiny_glm4v(seed=6), policy, params, inputs, qwen_single_row,
                                    drops=policy != "tome")


@pytest.mark.parametrize(("moe", "policy"), [(False, "fastv"), (False, "divprune"), (True, "h2o")])
def test_a_static_cache_equals_the_dynamic_one_and_decodes_in_one_compiled_graph(moe: bool, policy: str) -> None:
    """A padded batch decodes with a static cache as with a dynamic one, and transformers' compiled decode step is
    one graph that no step recompiles (as on Qwen2-VL: tests/test_qwen2_vl.py)."""
    model = tiny_glm4v(seed=1, moe=moe)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2)
    policyc.compile(model, policy)
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static"),
                       dynamic)
    assert_one_compiled_decode_graph(model, inputs, dynamic, max_new_tokens=5)
