"""Qwen2-VL and Qwen2.5-VL: the adapter, the identity policy bit-exact at every generate() step, FastV against an
independent M-RoPE reference (tests/reference/fastv_mrope.py), the standard library's LLM and decode policies
end to end with padded batches equal to single runs, and clear errors for what does not bind yet. ToMe in the
encoder: tests/test_qwen_encoder.py."""

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
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs, qwen_single_row, tiny_qwen2_vl

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.qwen2_vl import QwenVLAdapter
from policyc.report import measure

VERSIONS = ("2", "2.5")
GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens


def _assert_kept_image_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    """Each row's image tokens alive after prefill are the reference's, [n] indices into that row."""
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    for row, expected_row in enumerate(expected):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[image[row, kept]], expected_row)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_adapter_finds_the_parts(version: str) -> None:
    model = tiny_qwen2_vl(version=version)
    adapter = adapt(model)
    assert isinstance(adapter, QwenVLAdapter) and adapter.family == "qwen2_vl"
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert adapter.vision_layers is model.model.visual.blocks and adapter.projector is model.model.visual.merger
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("mrope", False, None, None)
    assert adapter.visual_ids == (QWEN_IMAGE_ID, 122) and adapter.encoder_patches_per_token == 4
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.image_sizes(make_qwen_inputs(grids=GRIDS)["input_ids"][0]) == [16, 8]
    assert "family qwen2_vl" in adapter.describe() and "(mrope)" in adapter.describe()


@pytest.mark.parametrize("version", VERSIONS)
def test_sample_inputs_are_what_the_model_takes(version: str) -> None:
    model = tiny_qwen2_vl(version=version)
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (64, 3 * 2 * 4 * 4) and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int(inputs["mm_token_type_ids"].sum()) == 16 == int((inputs["input_ids"] == QWEN_IMAGE_ID).sum())
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_the_reference_positions_match_the_models_own() -> None:
    """The reference's M-RoPE positions, written from the paper, are the model's (so the FastV test below
    compares against the model's real position scheme)."""
    model = tiny_qwen2_vl()
    inputs = make_qwen_inputs(grids=GRIDS)
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    grids = [(h, w) for _, h, w in inputs["image_grid_thw"].tolist()]
    assert torch.equal(mrope_positions(inputs["input_ids"][0], QWEN_IMAGE_ID, grids, 2), expected[:, 0])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(version: str, batch: int) -> None:
    assert_identity_is_bit_exact(tiny_qwen2_vl(version=version), make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2))


@pytest.mark.parametrize(("version", "seed", "layer", "keep"), [
    ("2", 0, 1, 12), ("2", 1, 0, 5), ("2", 2, 2, 20), ("2.5", 0, 1, 12), ("2.5", 3, 2, 6)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_mrope_reference(version: str, seed: int, layer: int, keep: int, batch: int) -> None:
    model = tiny_qwen2_vl(seed=seed, version=version)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_mrope_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=5)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.fixture(scope="module")
def deep_models() -> dict[str, torch.nn.Module]:
    """32-layer LLMs, so the standard library's layer indices (PyramidDrop's 7, 15, 23) exist."""
    return {version: tiny_qwen2_vl(version=version, num_llm_layers=32) for version in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("policy", "params", "drops"), LLM_POLICIES, ids=[p[0] for p in LLM_POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(
        deep_models: dict[str, torch.nn.Module], version: str, policy: str, params: dict, drops: bool) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=7)
    assert_batch_equals_single_runs(deep_models[version], policy, params, inputs, qwen_single_row, drops=drops)


@pytest.mark.parametrize("policy", ["pool", "grid", "mmtok"])
def test_projector_stages_needing_a_grid_or_the_question_fail_at_compile_time(policy: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen2_vl(), policy)
    assert "qwen2_vl's projector stages do not have yet" in str(error.value) and f"{policy}.tokpol:" in str(error.value)


@pytest.mark.parametrize(("version", "seed", "ratio"), [("2", 0, 25), ("2", 1, 50), ("2.5", 2, 25)])
@pytest.mark.parametrize("batch", [1, 2])
def test_divprune_equals_the_mrope_reference(version: str, seed: int, ratio: int, batch: int) -> None:
    """DivPrune at projector.output (the tower's merged tokens, each image on its own) against a plain reference:
    the same kept tokens, the LLM seeing them at their original M-RoPE positions, the same generated tokens."""
    model = tiny_qwen2_vl(seed=seed, version=version)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = projector_mrope_generate(
        model, inputs, lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=5)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("version", VERSIONS)
def test_divprune_batches_equal_single_runs(version: str) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=3)
    assert_batch_equals_single_runs(tiny_qwen2_vl(version=version), "divprune", {"ratio": "50%"}, inputs,
                                    qwen_single_row, drops=True)


def test_random_drop_keeps_its_share_of_each_image() -> None:
    """Random pruning (its random numbers follow the batch, by design: tests/reference/random_drop.py) keeps
    int(n * ratio) tokens of each image of its own size, in a padded batch."""
    model = tiny_qwen2_vl()
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=4)
    policyc.compile(model, "random_drop", ratio="50%")
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    kept_slots = model.policyc.images.kept if model.policyc.images.kept is not None else \
        model.policyc.runtime.image_slots[0]
    assert kept_slots.shape == (48,)  # two rows of a 16- and an 8-token image, packed
    per_image = [int(part.sum()) for part in torch.split(kept_slots, [16, 8, 16, 8])]
    assert per_image == [8, 4, 8, 4]


def test_streamingllm_pos_shift_fails_on_mrope_with_a_substitute() -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen2_vl(), "streamingllm")
    assert "M-RoPE" in str(error.value) and "heavy_hitter (H2O) or snapkv" in str(error.value)


@pytest.mark.parametrize("backend", ["inductor", "fx"])
def test_the_graph_backends_refuse_mrope(backend: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen2_vl(), "fastv", backend=backend)
    assert "uses M-RoPE" in str(error.value) and "fastv.tokpol:" in str(error.value)


def test_cls_signals_name_a_substitute() -> None:
    """FasterVLM ranks patches by the CLS token's attention, which Qwen's tower does not have: a substitute is named.
    (Encoder stages themselves: tests/test_qwen_encoder.py.)"""
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen2_vl(), "fastervlm")
    text = str(error.value)
    assert "has no CLS token" in text and "attention(last -> vision) in an LLM stage" in text


def test_the_compile_report_measures_qwen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_qwen2_vl()
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, adapt(model).sample_inputs(), "tiny-qwen2-vl")
    assert report.image_tokens == 16 and report.kept[0].after == 4
    assert report.flops_after.llm < report.flops_before.llm and report.flops_before.encoder > 0
    assert report.flops_before.encoder == report.flops_after.encoder  # no stage before the LLM


def test_a_saved_qwen_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_qwen2_vl(), tmp_path)


def test_kept_token_pictures_render(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The image comes back from its flattened patches exactly, and a picture of the kept tokens renders on its grid
    of merged tokens (what `policyc run --show-tokens` draws; tests/test_show_tokens.py checks the cells)."""
    from policyc.show_tokens import draw_kept_tokens

    model = tiny_qwen2_vl()
    adapter = adapt(model)
    inputs = adapter.sample_inputs()
    [image] = adapter.image_layouts(inputs)
    [view] = image.views
    assert adapter.draws_tokens and view.grid == (4, 4) and view.tokens == tuple(range(16))
    assert torch.equal(adapter.patchify(view.pixels), inputs["pixel_values"])
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, inputs, "tiny-qwen2-vl")
    assert len(report.kept[0].kept_patches) == 4 and all(0 <= p < 16 for p in report.kept[0].kept_patches)
    assert report.kept[0].kept_tokens == report.kept[0].kept_patches  # one image, no CLS: token j is cell j
    path = draw_kept_tokens(tmp_path / "kept.png", [image], report.kept)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("policy", ["fastv", "random_drop", "h2o"])
def test_a_static_cache_equals_the_dynamic_one_and_decodes_in_one_compiled_graph(version: str, policy: str) -> None:
    """generate() hands Qwen's forward a mask per layer type with a static cache (the padding is read from the
    full-attention one). A padded batch decodes as with a dynamic cache (H2O from static slot layers); and
    transformers' compiled decode step (its CUDA path, turned on for CPU with dynamo's eager backend) is one graph
    that no step or request recompiles."""
    model = tiny_qwen2_vl(seed=1, version=version)
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2)
    policyc.compile(model, policy)
    dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static"),
                       dynamic)
    assert_one_compiled_decode_graph(model, inputs, dynamic, max_new_tokens=5)


def test_the_report_counts_each_rows_own_kept_tokens_in_a_ragged_batch() -> None:
    """A row keeping fewer tokens than the batch's widest carries some dropped rows on as masked fillers: the report
    of each row (`policyc eval`'s image tokens and FLOPs) counts what that row kept alone, not its fillers."""
    from torch.nn.functional import pad

    from policyc.report import report_from_last_prefill

    model = tiny_qwen2_vl()
    rows = [make_qwen_inputs(1, grids=((8, 8),), seed=1), make_qwen_inputs(1, grids=((8, 16),), seed=2)]
    length = max(r["input_ids"].shape[1] for r in rows)
    batch = {key: torch.cat([pad(r[key], (length - r[key].shape[1], 0)) for r in rows])
             for key in ("input_ids", "attention_mask")}
    batch |= {key: torch.cat([r[key] for r in rows]) for key in ("pixel_values", "image_grid_thw")}
    policyc.compile(model, "fastv")  # 50% of each row's image tokens after layer 2

    def kept(inputs: dict[str, torch.Tensor], row: int) -> list[tuple[int, int]]:
        report = report_from_last_prefill(model.policyc, inputs["input_ids"], "fastv", row=row,
                                          attention_mask=inputs["attention_mask"])
        return [(stage.before, stage.after) for stage in report.kept] + [(report.prompt_tokens, report.image_tokens)]

    alone = []
    for inputs in rows:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        alone.append(kept(inputs, 0))
    model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert [kept(batch, row) for row in (0, 1)] == alone
    assert [a[0] for a in alone] == [(16, 8), (32, 16)]
