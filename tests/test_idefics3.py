"""Idefics3 and SmolVLM: the adapter, the identity policy bit-exact at every generate() step, FastV against an
independent reference (tests/reference/fastv_idefics3.py), the standard library's LLM and decode policies end to
end with padded batches equal to single runs, ToMe in the encoder against an unmerging reference
(tests/reference/tome_unmerge.py), and clear errors for what does not bind yet.

The batches mix layouts as the processor gives them: row 0 one image in 2x2 tiles plus its global view (20
image tokens), row 1 a 1x2-tiled image and an unsplit one (16 image tokens, fewer encoder inputs: its
`pixel_values` end in an all-zero padding image), left-padded."""

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
from reference.fastv_idefics3 import fastv_idefics3_generate, row_embeddings
from reference.tome_unmerge import groups_of, idefics3_encoder_images, tome_tower, with_tower_output
from tiny_idefics3 import IMAGE_ID, PATCH, TOKENS_PER_TILE, make_idefics3_inputs, single_row, tiny_idefics3

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.idefics3 import Idefics3Adapter
from policyc.report import measure, prefill_flops

CLASSES = {False: "Idefics3ForConditionalGeneration", True: "SmolVLMForConditionalGeneration"}
LAYOUTS = (((2, 2),), ((1, 2), (0, 0)))  # row 0: 4 tiles + global view; row 1: 2 tiles + global, one unsplit image


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_idefics3_inputs(batch=batch, images=LAYOUTS, pad_left=2, seed=seed)


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
def test_the_adapter_finds_the_parts(smolvlm: bool) -> None:
    model = tiny_idefics3(smolvlm=smolvlm)
    assert type(model).__name__ == CLASSES[smolvlm]
    adapter = adapt(model)
    assert isinstance(adapter, Idefics3Adapter) and adapter.family == "idefics3"
    assert adapter.decoder is model.model.text_model and adapter.decoder_layers is model.model.text_model.layers
    assert adapter.vision_layers is model.model.vision_model.encoder.layers and len(adapter.vision_layers) == 2
    assert adapter.projector is model.model.connector and adapter.rotary is model.model.text_model.rotary_emb
    assert (adapter.rope, adapter.has_cls, adapter.patch_grid, adapter.tokens_per_image) == ("1d", False, (4, 4), 4)
    assert adapter.visual_ids == (IMAGE_ID,) and adapter.encoder_patches_per_token == 4
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.image_sizes(_inputs(2)["input_ids"][1]) == [TOKENS_PER_TILE] * 4  # 2 tiles, 2 global views
    assert "family idefics3" in adapter.describe() and "(1d)" in adapter.describe()


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
def test_sample_inputs_are_what_the_model_takes(smolvlm: bool) -> None:
    model = tiny_idefics3(smolvlm=smolvlm)
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (1, 5, 3, 32, 32) and bool(inputs["pixel_attention_mask"].all())
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 5 * TOKENS_PER_TILE
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_the_reference_embeddings_are_the_models_own() -> None:
    """The reference builds each row's LLM input from its own tiles (padding images skipped, patch masks from
    the pixel masks): the model's own text model on those embeddings gives the model's logits."""
    model = tiny_idefics3()
    inputs = _inputs(2)
    with torch.no_grad():
        expected = model(**inputs).logits
        for row in range(2):
            alone = single_row(inputs, row)
            embeds = row_embeddings(model, alone["input_ids"][0], alone["pixel_values"][0],
                                    alone["pixel_attention_mask"][0])
            hidden = model.model.text_model(inputs_embeds=embeds[None]).last_hidden_state
            valid = inputs["attention_mask"][row].bool()
            torch.testing.assert_close(model.lm_head(hidden)[0], expected[row, valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(smolvlm: bool, batch: int) -> None:
    assert_identity_is_bit_exact(tiny_idefics3(smolvlm=smolvlm), _inputs(batch))


@pytest.mark.parametrize(("smolvlm", "seed", "layer", "keep"), [
    (False, 0, 1, 8), (False, 1, 0, 3), (False, 2, 2, 13), (True, 0, 1, 8), (True, 3, 2, 5)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_reference(smolvlm: bool, seed: int, layer: int, keep: int, batch: int) -> None:
    """FastV ranks every `<image>` token of a row's tiles and global views together; the markers between them
    (`<fake_token_around_image>`, `<row_r_col_c>`, `<global-img>`, newlines) stay as text."""
    model = tiny_idefics3(seed=seed, smolvlm=smolvlm)
    inputs = _inputs(batch, seed)
    expected_tokens, expected_kept = fastv_idefics3_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=5)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    try:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        image = inputs["input_ids"] == IMAGE_ID
        state = model.policyc.runtime.state
        live = state.live()  # the rows keep different counts of tokens: the shorter one carries fillers
        for row in range(batch):
            kept = state.kept[row] if live is None else state.kept[row, live[row]]
            assert torch.equal(kept[image[row, kept]], expected_kept[row])
            assert int((~image[row, kept]).sum()) == int((~image[row]).sum())  # every marker and text token stays
    finally:
        model.policyc.remove()
    assert torch.equal(tokens, expected_tokens)


@pytest.fixture(scope="module")
def deep_models() -> dict[bool, torch.nn.Module]:
    """32-layer LLMs, so the standard library's layer indices (PyramidDrop's 7, 15, 23) exist."""
    return {smolvlm: tiny_idefics3(smolvlm=smolvlm, num_llm_layers=32) for smolvlm in (False, True)}


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
@pytest.mark.parametrize(("policy", "params", "drops"), LLM_POLICIES, ids=[p[0] for p in LLM_POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(
        deep_models: dict[bool, torch.nn.Module], smolvlm: bool, policy: str, params: dict, drops: bool) -> None:
    assert_batch_equals_single_runs(deep_models[smolvlm], policy, params, _inputs(2, seed=7), single_row,
                                    drops=drops)


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
@pytest.mark.parametrize(("r", "batch", "layouts"), [(2, 1, LAYOUTS), (4, 2, LAYOUTS), (8, 2, (((0, 0),), ((0, 0),)))])
def test_tome_equals_the_unmerge_reference(smolvlm: bool, r: int, batch: int, layouts: tuple) -> None:
    """ToMe per tile (merges between attention and MLP, proportional attention), unmerged at the tower's output: the
    same merged groups and logits as tests/reference/tome_unmerge.py. The global views of split images have padded
    patches (never merged, masked as keys). r=8 on unsplit images merges every pair it can; with padding r stays
    below what the padded views allow (the runtime takes the smallest r over the batch, the reference one image)."""
    model = tiny_idefics3(seed=r, smolvlm=smolvlm)
    inputs = make_idefics3_inputs(batch=batch, images=layouts, pad_left=2, seed=r)
    pixels, padded = idefics3_encoder_images(inputs, PATCH)
    assert padded.any() == (layouts == LAYOUTS)
    hidden, groups = tome_tower(model, pixels, r, padded)
    expected = with_tower_output(model, inputs, hidden)
    logits, images = tome_forward(model, inputs, r)
    assert groups_of(images.merged_into) == groups
    assert images.encoder_rows.tolist() == [[16, 16 - r]] * pixels.shape[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
def test_tome_generates_and_batches_equal_single_runs(deep_models: dict[bool, torch.nn.Module], smolvlm: bool) -> None:
    assert_batch_equals_single_runs(deep_models[smolvlm], "tome", {"r": 4}, _inputs(2, seed=7), single_row)


def test_tome_shrinks_the_encoders_flops_not_the_llms() -> None:
    model = tiny_idefics3()
    report = assert_tome_shrinks_only_the_encoder(model, 4, "tiny-idefics3")
    assert report.image_tokens == 20


@pytest.mark.parametrize(("policy", "reason"), [
    ("visionzip", "has no CLS token"),
    ("policy p { stage encoder.layer[1] { drop top 4 of vision by key_norm } }",
     "removes tokens, but idefics3's connector needs every patch"),
])
def test_what_cannot_be_unmerged_fails_at_compile_time(policy: str, reason: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_idefics3(), check_source(policy)[0] if policy.startswith("policy") else policy)
    assert reason in str(error.value)
    if "connector" in reason:
        assert "at projector.output (e.g. divprune) or in the LLM (e.g. fastv)" in str(error.value)


def test_cls_signals_name_a_substitute() -> None:
    """FasterVLM ranks patches by the CLS token's attention: both problems are reported, with a substitute."""
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_idefics3(smolvlm=True), "fastervlm")
    text = str(error.value)
    assert "has no CLS token" in text
    assert "attention(last -> vision) in an LLM stage" in text


def test_streamingllm_runs_on_1d_positions() -> None:
    """The LLM's positions are 1-D, so StreamingLLM's pos-shift cache binds (unlike on Qwen2-VL's M-RoPE); a window
    shorter than the prompt evicts, and a padded batch still equals its rows alone."""
    text = "policy s { stage decode { cache sink_window(sinks=2, window=8) } }"
    assert_batch_equals_single_runs(tiny_idefics3(), check_source(text)[0], {}, _inputs(2, seed=5), single_row)


def test_the_compile_report_counts_tiles() -> None:
    """Each tile and global view is one encoder input: the encoder's FLOPs are 5 images' worth, the LLM's shrink."""
    model = tiny_idefics3()
    adapter = adapt(model)
    policyc.compile(model, "fastv", ratio="25%")
    report = measure(model.policyc, adapter.sample_inputs(), "tiny-idefics3")
    assert report.image_tokens == 20 and report.kept[0].after == 5
    assert report.flops_after.llm < report.flops_before.llm
    assert report.flops_before.encoder == report.flops_after.encoder  # no stage before the LLM
    assert report.flops_before.encoder == 5 * prefill_flops(adapter, [0] * 4, images=1).encoder > 0


def test_a_saved_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for smolvlm, name in CLASSES.items():
        assert_saved_directory_compiles(tiny_idefics3(smolvlm=smolvlm), tmp_path / name)
