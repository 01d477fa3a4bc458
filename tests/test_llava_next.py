"""LLaVA-NeXT and LLaVA-OneVision (anyres images; OneVision also several images per prompt and videos): the adapters,
the identity policy bit-exact at every generate() step, FastV against an independent anyres reference
(tests/reference/fastv_anyres.py), the standard library's LLM and decode policies end to end with padded batches
equal to single runs, ToMe in the encoder against an unmerging reference (tests/reference/tome_unmerge.py), and clear
errors for what does not bind yet."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from family_checks import (
    LLM_POLICIES,
    assert_batch_equals_single_runs,
    assert_identity_is_bit_exact,
    assert_saved_directory_compiles,
    tome_forward,
)
from PIL import Image
from reference.fastv_anyres import fastv_anyres_generate
from reference.tome_unmerge import groups_of, tome_tower, tower_inputs, with_tower_output
from tiny_llava_next import (
    FAMILIES,
    IMAGE_ID,
    VIDEO_ID,
    make_anyres_inputs,
    next_processor,
    single_row,
    tiny_anyres,
)

import policyc
from policyc.cli import main
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.llava_next import AnyresAdapter
from policyc.report import measure

# Per family, the images of each row: rows of different sizes (different image-token counts, so left padding);
# OneVision's second row holds two images (base views only) and every OneVision row a 3-frame video.
IMAGES = {"llava_next": [[(40, 24)], [(30, 64)]], "llava_onevision": [[(64, 64)], [(30, 64), (20, 20)]]}
VIDEOS = {"llava_next": (), "llava_onevision": (3, 3)}


def _inputs(family: str, model: torch.nn.Module, batch: int, seed: int = 0, pad_left: int = 2) -> dict:
    return make_anyres_inputs(model, IMAGES[family][:batch], VIDEOS[family][:batch], pad_left=pad_left, seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_finds_the_parts(family: str) -> None:
    model = tiny_anyres(family)
    adapter = adapt(model)
    assert isinstance(adapter, AnyresAdapter) and adapter.family == family
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert len(adapter.vision_layers) == 2
    assert any(m is adapter.vision_layers for m in model.model.vision_tower.modules())
    assert adapter.projector is model.model.multi_modal_projector
    onevision = family == "llava_onevision"
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("1d", not onevision, None,
                                                                                            None)
    assert adapter.visual_ids == ((IMAGE_ID, VIDEO_ID) if onevision else (IMAGE_ID,))
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.feature_start == (0 if onevision else 1) and adapter.crop_size == (32, 32)
    inputs = _inputs(family, model, 2)
    assert adapter.image_sizes(inputs["input_ids"][0]) == [int((inputs["input_ids"][0] == IMAGE_ID).sum())]
    assert f"family {family}" in adapter.describe() and "(1d)" in adapter.describe()


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_inputs_are_what_the_model_takes(family: str) -> None:
    """The calibration image is the first grid pinpoint: the base view and its crops, with its size."""
    model = tiny_anyres(family)
    inputs = adapt(model).sample_inputs()
    crops = 2 if family == "llava_next" else 1  # pinpoints [32, 64] and [32, 32]
    assert inputs["pixel_values"].shape == (1, 1 + crops, 3, 32, 32)
    assert inputs["image_sizes"].tolist() == [[32, 32 * crops]]
    # base view 4x4 tokens, then the crops' 4 x 4*crops tokens, each of the 4 rows ended by a newline
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 16 + 4 * (4 * crops + 1)
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_the_input_builder_places_what_the_llava_next_processor_places() -> None:
    """The placeholder runs of `make_anyres_inputs` (the model's own packed features) are as long as
    `LlavaNextProcessor` expands `<image>` to (its formula), for several sizes; the pixels are its processor's."""
    model = tiny_anyres("llava_next")
    processor = next_processor()
    image_id = processor.image_token_id
    sizes = [[(40, 24)], [(30, 64)], [(64, 64)], [(17, 90)]]
    ours = make_anyres_inputs(model, sizes)
    pictures = [Image.new("RGB", (w, h)) for row in sizes for h, w in row]
    theirs = processor(text=["<image> what ?"] * len(sizes), images=pictures, return_tensors="pt", padding=True)
    assert torch.equal((ours["input_ids"] == IMAGE_ID).sum(1), (theirs["input_ids"] == image_id).sum(1))
    assert torch.equal(ours["image_sizes"], theirs["image_sizes"])
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(family: str, batch: int) -> None:
    model = tiny_anyres(family)
    assert_identity_is_bit_exact(model, _inputs(family, model, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_keeping_every_visual_token_is_the_model(family: str) -> None:
    """The reference's prompt (its own anyres embeddings, newline and video features included) and LLM loop, keeping
    every visual token, generate what the unmodified model generates (EOS off: the reference never stops early)."""
    model = tiny_anyres(family, seed=5)
    inputs = _inputs(family, model, 2, seed=5)
    expected, _ = fastv_anyres_generate(model, inputs, layer=1, keep=1.0, max_new_tokens=5)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.max_new_tokens, config.do_sample = None, 5, False
    with torch.no_grad():
        tokens = model.generate(**inputs, generation_config=config)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize(("family", "seed", "layer", "keep"), [
    ("llava_next", 0, 1, 12), ("llava_next", 1, 0, 0.5), ("llava_next", 2, 2, 30), ("llava_next", 3, 1, 0.25),
    ("llava_onevision", 0, 1, 12), ("llava_onevision", 1, 0, 0.5), ("llava_onevision", 2, 2, 40),
    ("llava_onevision", 3, 3, 0.3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_anyres_reference(family: str, seed: int, layer: int, keep: int | float, batch: int) -> None:
    """The same kept visual tokens (newline and video tokens included) and the same generated tokens; a share
    keeps different counts in rows with different image sizes."""
    model = tiny_anyres(family, seed=seed)
    inputs = _inputs(family, model, batch, seed=seed)
    expected_tokens, expected_kept = fastv_anyres_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=5)
    amount = keep if isinstance(keep, int) else f"{round(keep * 100)}%"
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {amount} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    try:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        visual = torch.isin(inputs["input_ids"], torch.tensor([IMAGE_ID, VIDEO_ID]))
        for row in range(batch):
            kept = model.policyc.kept_positions[row]
            live = model.policyc.runtime.state.live()
            kept = kept[live[row]] if live is not None else kept
            assert torch.equal(kept[visual[row, kept]], expected_kept[row])
        assert torch.equal(tokens, expected_tokens)
    finally:
        model.policyc.remove()


@pytest.fixture(scope="module")
def deep_models() -> dict[str, torch.nn.Module]:
    """32-layer LLMs, so the standard library's layer indices (PyramidDrop's 7, 15, 23) exist."""
    return {family: tiny_anyres(family, num_llm_layers=32) for family in FAMILIES}


POLICIES = [*LLM_POLICIES, ("streamingllm", {"sinks": 4, "window": 16}, False)]  # 1-D RoPE: pos-shift applies


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("policy", "params", "drops"), POLICIES, ids=[p[0] for p in POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(
        deep_models: dict[str, torch.nn.Module], family: str, policy: str, params: dict, drops: bool) -> None:
    model = deep_models[family]
    assert_batch_equals_single_runs(model, policy, params, _inputs(family, model, 2, seed=7), single_row, drops=drops)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("r", "batch"), [(2, 1), (4, 2), (8, 2)])
def test_tome_equals_the_unmerge_reference(family: str, r: int, batch: int) -> None:
    """ToMe in every encoder input (base views, crops, OneVision's video frames; CLIP's CLS never merges), unmerged
    at the feature layer (LLaVA-NeXT's hidden_states[-2]: only layer 0 runs; OneVision's last layer), then the
    model's own unpadding and newlines: the same merged groups (the tower's last call) and logits as
    tests/reference/tome_unmerge.py. r=8 merges every pair it can."""
    model = tiny_anyres(family, seed=r)
    inputs = _inputs(family, model, batch, seed=r)
    feature_layer = model.config.vision_feature_layer % (model.config.vision_config.num_hidden_layers + 1)
    calls = [tome_tower(model, pixels, r, feature_layer=feature_layer) for pixels in tower_inputs(model, inputs)]
    assert len(calls) == (2 if family == "llava_onevision" else 1)  # OneVision: images, then video frames
    expected = with_tower_output(model, inputs, [hidden for hidden, _ in calls], feature_layer=feature_layer)
    logits, images = tome_forward(model, inputs, r)
    assert groups_of(images.merged_into) == calls[-1][1]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_tome_generates_and_batches_equal_single_runs(deep_models: dict[str, torch.nn.Module], family: str) -> None:
    model = deep_models[family]
    assert_batch_equals_single_runs(model, "tome", {"r": 4}, _inputs(family, model, 2, seed=7), single_row)


@pytest.mark.parametrize("family", FAMILIES)
def test_what_cannot_be_unmerged_fails_at_compile_time(family: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_anyres(family), "visionzip")
    text = str(error.value)
    # SigLIP (OneVision): VisionZip's CLS ranking fails first
    reason = "has no CLS token" if family == "llava_onevision" else f"removes tokens, but {family}'s connector needs"
    assert reason in text and "visionzip.tokpol:" in text


def test_cls_signals_name_a_substitute_on_onevision() -> None:
    """SigLIP has no CLS token: FasterVLM's CLS ranking is reported with a substitute."""
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_anyres("llava_onevision"), "fastervlm")
    text = str(error.value)
    assert "has no CLS token" in text
    assert "attention(last -> vision) in an LLM stage" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_the_compile_report_measures_anyres(family: str) -> None:
    model = tiny_anyres(family)
    policyc.compile(model, "fastv", ratio="25%")
    try:
        inputs = adapt(model).sample_inputs()
        report = measure(model.policyc, inputs, f"tiny-{family}")
    finally:
        model.policyc.remove()
    tokens = int((inputs["input_ids"] == IMAGE_ID).sum())
    assert report.image_tokens == tokens and report.kept[0].after == tokens // 4
    assert report.flops_after.llm < report.flops_before.llm and report.flops_before.encoder > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_directory_compiles_from_the_command_line(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_anyres(family), tmp_path)



def test_the_fx_backend_equals_eager_on_one_prompt_and_refuses_mixed_image_sizes() -> None:
    """The graph backends rewrite 1-D RoPE decoders, so they run LLaVA-NeXT; they need every sample of a batch to
    keep the same count, which images of different sizes (different image-token counts) do not."""
    text = "policy f { stage llm.layer[1] { keep top 12 of vision by attention(last -> vision) } }"
    model = tiny_anyres("llava_next")
    one = _inputs("llava_next", model, 1)
    policyc.compile(model, check_source(text)[0])
    try:
        expected = model.generate(**one, max_new_tokens=5, do_sample=False)
    finally:
        model.policyc.remove()
    policyc.compile(model, check_source(text)[0], backend="fx")
    try:
        assert torch.equal(model.generate(**one, max_new_tokens=5, do_sample=False), expected)
        with pytest.raises(PolicyError, match="the graph backends need every sample to keep the same count"):
            model.generate(**_inputs("llava_next", model, 2), max_new_tokens=5, do_sample=False)
    finally:
        model.policyc.remove()


def test_policyc_run_answers_on_a_saved_llava_next_with_its_processor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policyc run DIR fastv` on a LLaVA-NeXT directory holding its processor: the example image through anyres,
    the tokens kept per stage; `--show-tokens` draws the kept tokens of the image's base view."""
    model = tiny_anyres("llava_next", vocab=272, image_id=3)
    model.save_pretrained(tmp_path / "next")
    next_processor().save_pretrained(tmp_path / "next")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "next"), "fastv", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "tokens kept per stage" in result.output and "llm.layer[layer]" in result.output
    result = CliRunner().invoke(main, ["run", str(tmp_path / "next"), "divprune", "--show-tokens",
                                       str(tmp_path / "tokens.png")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
