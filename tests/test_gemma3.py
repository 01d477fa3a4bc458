"""Gemma 3: the adapter, the identity policy bit-exact at every generate() step, FastV against an independent plain
reference with Gemma 3's own masks (tests/reference/fastv_gemma3.py: bidirectional image blocks, sliding windows),
the masks the layers see after a drop, the standard library's LLM and decode policies end to end with padded
batches equal to single runs, and clear errors for what does not bind."""

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
from reference.fastv_gemma3 import fastv_gemma3_generate, gemma3_allowed
from reference.tome_unmerge import groups_of, tome_tower, with_tower_output
from tiny_gemma3 import GEMMA_IMAGE_ID, IMAGE_TOKENS, WINDOW, make_gemma3_inputs, single_gemma3, tiny_gemma3

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.gemma3 import Gemma3Adapter
from policyc.report import measure


def _fastv(layer: int, keep: int) -> str:
    return f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"


def test_the_adapter_finds_the_parts() -> None:
    model = tiny_gemma3()
    adapter = adapt(model)
    assert isinstance(adapter, Gemma3Adapter) and adapter.family == "gemma3"
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 6
    assert adapter.vision_layers is model.model.vision_tower.encoder.layers
    assert adapter.projector is model.model.multi_modal_projector
    assert (adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid, adapter.rope) == (False, 16, (8, 8), "1d")
    assert adapter.visual_ids == (GEMMA_IMAGE_ID,) and adapter.encoder_patches_per_token == 4
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert adapter.image_sizes(make_gemma3_inputs(images=2)["input_ids"][0]) == [16, 16]
    assert "family gemma3" in adapter.describe()


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_gemma3()
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int(inputs["token_type_ids"].sum()) == IMAGE_TOKENS == int((inputs["input_ids"] == GEMMA_IMAGE_ID).sum())
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_the_reference_masks_are_the_models_own() -> None:
    """The reference's masks, written from the spec, are the ones transformers builds for Gemma 3 (so the FastV
    test compares against the model's real attention pattern): both layer types, two images, past the window."""
    from transformers.masking_utils import create_masks_for_generate  # noqa: F401  (the model builds its own below)

    model = tiny_gemma3()
    inputs = make_gemma3_inputs(images=2)
    seen: dict[str, torch.Tensor] = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.update(kwargs["attention_mask"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    image = inputs["input_ids"][0] == GEMMA_IMAGE_ID
    length = image.shape[0]
    assert length > 2 * WINDOW
    assert torch.equal(seen["full_attention"][0, 0], gemma3_allowed(image, length, None))
    assert torch.equal(seen["sliding_attention"][0, 0], gemma3_allowed(image, length, WINDOW))


@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(batch: int) -> None:
    """Prompts of 45 tokens cross the window of 8: sliding caches, per-type masks and rotaries stay the model's."""
    assert_identity_is_bit_exact(tiny_gemma3(), make_gemma3_inputs(batch=batch, images=2, pad_left=2))


@pytest.mark.parametrize(("seed", "layer", "keep", "window"), [
    (0, 1, 12, WINDOW), (1, 0, 5, WINDOW), (2, 2, 20, WINDOW), (0, 1, 12, 24), (3, 3, 9, 24), (4, 0, 24, 64)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_gemma3_reference(seed: int, layer: int, keep: int, window: int, batch: int) -> None:
    """Drops at sliding layers (0, 1, 3) and a global one (2); windows shorter than the prompt (8, 24) and longer
    (64); two images per row, left padding."""
    model = tiny_gemma3(seed=seed, window=window)
    inputs = make_gemma3_inputs(batch=batch, images=2, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_gemma3_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=5)
    policyc.compile(model, check_source(_fastv(layer, keep))[0])
    try:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        image = inputs["input_ids"] == GEMMA_IMAGE_ID
        for row in range(batch):
            kept = model.policyc.kept_positions[row]
            assert torch.equal(kept[image[row, kept]], expected_kept[row])
        assert torch.equal(tokens, expected_tokens)
    finally:
        model.policyc.remove()


def test_kept_image_tokens_still_see_each_other_both_ways() -> None:
    """After a drop at layer 1, layer 2 (global) and layer 3 (sliding) get the kept rows and columns of their own
    masks: kept tokens of one image see each other both ways, not the other image's later tokens, and the window
    counts original positions."""
    model = tiny_gemma3(window=24)
    inputs = make_gemma3_inputs(images=2)
    seen: dict[int, torch.Tensor] = {}

    def keep_mask(index: int):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
            seen.setdefault(index, kwargs["attention_mask"])
        return hook

    policyc.compile(model, check_source(_fastv(1, 10))[0])
    layers = model.model.language_model.layers
    handles = [layers[index].inner.register_forward_pre_hook(keep_mask(index), with_kwargs=True) for index in (2, 3)]
    try:
        with torch.no_grad():
            model(**inputs)
        kept = model.policyc.kept_positions[0]
    finally:
        model.policyc.remove()
        for handle in handles:
            handle.remove()
    image = inputs["input_ids"][0] == GEMMA_IMAGE_ID
    length = image.shape[0]
    assert kept.shape[0] == length - 2 * IMAGE_TOKENS + 10
    for index, window in ((2, None), (3, 24)):
        expected = gemma3_allowed(image, length, window)[kept][:, kept]
        assert torch.equal(seen[index][0, 0], expected)
    kept_image = kept[image[kept]]
    first = kept_image[kept_image < kept_image.max()]  # a kept token of the first image sees a later one
    assert seen[2][0, 0][(kept == first[0]).nonzero()[0, 0], (kept == first[-1]).nonzero()[0, 0]]


@pytest.fixture(scope="module")
def deep_model() -> torch.nn.Module:
    """A 32-layer LLM (sliding, sliding, global, ...), so the standard library's layer indices exist."""
    return tiny_gemma3(num_llm_layers=32, window=24)


@pytest.mark.parametrize(("policy", "params", "drops"), LLM_POLICIES, ids=[p[0] for p in LLM_POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(
        deep_model: torch.nn.Module, policy: str, params: dict, drops: bool) -> None:
    inputs = make_gemma3_inputs(batch=2, images=2, pad_left=2, seed=7)
    assert_batch_equals_single_runs(deep_model, policy, params, inputs, single_gemma3, drops=drops)


@pytest.mark.parametrize(("r", "batch"), [(4, 1), (8, 2), (20, 2), (40, 1)])
def test_tome_equals_the_unmerge_reference(r: int, batch: int) -> None:
    """ToMe in the SigLIP tower (merges between attention and MLP, proportional attention), unmerged at the tower's
    output: the same merged groups and logits as tests/reference/tome_unmerge.py (r=40 merges everything it can)."""
    model = tiny_gemma3(seed=r)
    inputs = make_gemma3_inputs(batch=batch, images=2, pad_left=2, seed=r)
    hidden, groups = tome_tower(model, inputs["pixel_values"], r)
    expected = with_tower_output(model, inputs, hidden)
    logits, images = tome_forward(model, inputs, r)
    assert groups_of(images.merged_into) == groups
    assert images.encoder_rows[:, 0].eq(64).all() and images.encoder_rows[:, 1].lt(64).all()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_tome_generates_and_batches_equal_single_runs(deep_model: torch.nn.Module) -> None:
    inputs = make_gemma3_inputs(batch=2, images=2, pad_left=2, seed=7)
    assert_batch_equals_single_runs(deep_model, "tome", {"r": 8}, inputs, single_gemma3)


def test_tome_shrinks_the_encoders_flops_not_the_llms() -> None:
    model = tiny_gemma3()
    report = assert_tome_shrinks_only_the_encoder(model, 16, "tiny-gemma3")
    assert report.image_tokens == IMAGE_TOKENS


@pytest.mark.parametrize(("policy", "reason"), [
    ("visionzip", "has no CLS token"),
    ("policy p { stage encoder.layer[0] { keep top 10 of vision by key_norm } }",
     "removes tokens, but gemma3's connector needs every patch"),
    ("policy p { stage encoder.output { merge bipartite(r=4) of vision by keys } }",
     "would choose what the connector reads"),
])
def test_what_cannot_be_unmerged_fails_at_compile_time(policy: str, reason: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_gemma3(), check_source(policy)[0] if policy.startswith("policy") else policy)
    assert reason in str(error.value)
    if "connector" in reason:
        assert "in the LLM (e.g. fastv)" in str(error.value)


def test_streamingllm_pos_shift_fails_with_a_substitute() -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_gemma3(), "streamingllm")
    assert "sliding-window" in str(error.value) and "heavy_hitter (H2O) or snapkv" in str(error.value)


@pytest.mark.parametrize("backend", ["inductor", "fx"])
def test_the_graph_backends_refuse_gemma3(backend: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_gemma3(), "fastv", backend=backend)
    assert "sliding-window and global layers" in str(error.value) and "fastv.tokpol:" in str(error.value)


def test_a_static_cache_fails_clearly() -> None:
    model = tiny_gemma3()
    policyc.compile(model, "fastv")
    try:
        with pytest.raises(PolicyError) as error:
            model.generate(**make_gemma3_inputs(), max_new_tokens=2, do_sample=False, cache_implementation="static")
    finally:
        model.policyc.remove()
    assert "static cache with sliding-window layers" in str(error.value)


def test_cls_signals_name_a_substitute() -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_gemma3(), "fastervlm")
    text = str(error.value)
    assert "has no CLS token" in text
    assert "attention(last -> vision) in an LLM stage" in text


def test_the_compile_report_measures_gemma3() -> None:
    model = tiny_gemma3()
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, adapt(model).sample_inputs(), "tiny-gemma3")
    assert report.image_tokens == IMAGE_TOKENS and report.kept[0].after == 4
    assert report.flops_after.llm < report.flops_before.llm and report.flops_before.encoder > 0


def test_a_saved_gemma3_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_gemma3(), tmp_path)
