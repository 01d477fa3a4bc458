"""Mistral 3 (Mistral Small 3.1/3.2, Ministral 3) with its Pixtral tower: the adapter and its grouping of an image's
`[IMG]` rows (up to `[IMG_END]`, the breaks text), the identity policy bit-exact at every generate() step, FastV
against the plain reference (tests/reference/fastv_anyres.py runs unchanged: the model's own image features over
the `[IMG]` placeholders, LLaVA's FastV loop), DivPrune per image against the shorter-prompt reference
(tests/reference/before_llm.py), kept-token pictures, clear errors for what does not bind. Both LLMs: Mistral and
Ministral 3 (whose attention scale reads position_ids). The standard library with padded batches:
tests/test_mistral3_policies.py."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_is_bit_exact, assert_saved_directory_compiles
from reference.before_llm import before_llm_run
from reference.divprune import divprune_keep
from reference.fastv_anyres import fastv_anyres_generate
from tiny_mistral3 import (
    BREAK_ID,
    END_ID,
    IMAGE_ID,
    TEXT_MODELS,
    image_ids,
    make_mistral3_inputs,
    single_mistral3,
    tiny_mistral3,
)

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.mistral3 import Mistral3Adapter
from policyc.report import report_from_last_prefill
from policyc.show_tokens import DROPPED, cell_shades, draw_kept_tokens

# Row 0: one 48x64 image (3x4 tokens); row 1: 32x48 (2x3) and 64x32 (4x2): other sizes, counts and padding.
IMAGES = [[(48, 64)], [(32, 48), (64, 32)]]


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_mistral3_inputs(IMAGES[:batch], pad_left=2, seed=seed)


@pytest.mark.parametrize("text", TEXT_MODELS)
def test_the_adapter_finds_the_parts(text: str) -> None:
    model = tiny_mistral3(text=text)
    adapter = adapt(model)
    assert isinstance(adapter, Mistral3Adapter) and adapter.family == "mistral3"
    assert adapter.vision_tower is model.model.vision_tower and adapter.vision_layers is \
        model.model.vision_tower.transformer.layers
    assert adapter.projector is model.model.multi_modal_projector
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("1d", False, None, None)
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim, adapter.encoder_patches_per_token) == \
        (4, 2, 16, 4)
    assert adapter.visual_ids == (IMAGE_ID,) and "family mistral3" in adapter.describe()


def test_an_image_is_its_rows_up_to_img_end() -> None:
    """Each row of an image is a run of [IMG]; [IMG_BREAK] and [IMG_END] are text (-1); an image ends at [IMG_END],
    also where the next image follows at once; token counts per image follow the image sizes."""
    adapter = adapt(tiny_mistral3())
    ids = torch.tensor([[5, *image_ids(32, 48), *image_ids(48, 16), 7, *image_ids(16, 16), 8]])
    index = adapter.image_index(ids)[0]
    expected = [-1] + ([0] * 3 + [-1]) * 2 + [1, -1] * 3 + [-1, 2, -1, -1]
    assert index.tolist() == expected
    assert adapter.image_sizes(ids[0]) == [6, 3, 1]
    inputs = _inputs(2)
    assert [adapter.image_sizes(row) for row in inputs["input_ids"]] == [[12], [6, 8]]
    assert not adapter.visual_mask(torch.tensor([[BREAK_ID, END_ID]])).any()


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_mistral3()
    inputs = adapt(model).sample_inputs()
    assert inputs["image_sizes"].tolist() == [[64, 96]] and inputs["pixel_values"].shape == (1, 3, 64, 96)
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 24
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("text", TEXT_MODELS)
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(text: str, batch: int) -> None:
    model = tiny_mistral3(text=text)
    assert_identity_is_bit_exact(model, _inputs(batch))


@pytest.mark.parametrize(("text", "seed", "layer", "keep"), [
    ("mistral", 0, 1, 5), ("mistral", 1, 0, 0.5), ("mistral", 2, 2, 0.25), ("ministral3", 3, 1, 0.5),
    ("ministral3", 4, 2, 7)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_equals_the_reference(text: str, seed: int, layer: int, keep: int | float, batch: int) -> None:
    """The same kept [IMG] tokens (the breaks are text: never candidates, always kept) and generated tokens as the
    reference; a share keeps different counts in rows with different image sizes."""
    model = tiny_mistral3(seed=seed, text=text)
    inputs = _inputs(batch, seed)
    expected_tokens, expected_kept = fastv_anyres_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=5)
    amount = keep if isinstance(keep, int) else f"{round(keep * 100)}%"
    source = f"policy f {{ stage llm.layer[{layer}] {{ keep top {amount} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(source)[0])
    try:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        _assert_kept(model, inputs, expected_kept)
        assert torch.equal(tokens, expected_tokens)
    finally:
        model.policyc.remove()


def _assert_kept(model: torch.nn.Module, inputs: dict[str, torch.Tensor], expected: list[torch.Tensor]) -> None:
    """The kept [IMG] positions of each row are `expected`; every break and end token reached the LLM."""
    ids = inputs["input_ids"]
    live = model.policyc.runtime.state.live()  # None unless rows kept different counts (fillers)
    for row in range(ids.shape[0]):
        kept = model.policyc.kept_positions[row]
        kept = kept if live is None else kept[live[row]]
        assert torch.equal(kept[ids[row, kept] == IMAGE_ID], expected[row])
        separators = torch.isin(ids[row], torch.tensor([BREAK_ID, END_ID])).nonzero().flatten()
        assert bool(torch.isin(separators, kept).all())


@pytest.mark.parametrize(("text", "seed", "ratio", "batch"), [
    ("mistral", 0, 50, 1), ("mistral", 1, 25, 2), ("ministral3", 2, 75, 2), ("ministral3", 3, 40, 2)])
def test_divprune_per_image_equals_the_reference(text: str, seed: int, ratio: int, batch: int) -> None:
    """DivPrune on each image's projected tokens (the projector's output split by image): the same kept tokens,
    generated tokens and logits (within 1e-5) as the shorter prompt of the reference, breaks kept."""
    model = tiny_mistral3(seed=seed, text=text)
    inputs = _inputs(batch, seed)
    sizes = [adapt(model).image_sizes(row) for row in inputs["input_ids"]]
    expected_tokens, expected_kept, expected_logits = before_llm_run(
        model, inputs, IMAGE_ID, sizes, lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0],
        max_new_tokens=5)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    try:
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        _assert_kept(model, inputs, expected_kept)
    finally:
        model.policyc.remove()
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], expected_tokens)
    scale = float(expected_logits.abs().max())  # std-0.2 weights: logits reach ~6, so 1e-5 of that scale
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, rtol=0, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize(("policy", "reason"), [
    ("visionzip", "has no CLS token"), ("fastervlm", "has no CLS token"),
    ("pool", "pool needs the image patch grid, which mistral3's projector stages do not have yet"),
    ("mmtok", "needs the question, which mistral3's projector stages do not have yet")])
def test_what_does_not_bind_fails_at_compile_time(policy: str, reason: str) -> None:
    """Pixtral has no CLS token: VisionZip's and FasterVLM's CLS rankings fail, naming the VisionZip-style policy
    that runs (visiondrop_llm, tests/test_mistral3_policies.py); images of their own sizes share no token grid."""
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_mistral3(), policy)
    text = str(error.value)
    assert reason in text and f"{policy}.tokpol:" in text
    if reason == "has no CLS token":
        assert "visiondrop_llm" in text


@pytest.mark.parametrize("batch", [1, 2])
def test_kept_token_pictures_darken_exactly_the_dropped_tokens(batch: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each image of each row is drawn cropped to its size on its (H/16)x(W/16) token grid (its rows of [IMG],
    breaks skipped); after DivPrune the darkened cells are exactly its tokens that did not reach the LLM; a row of
    a batch lays out as the row alone; a PNG renders."""
    model = tiny_mistral3()
    inputs = _inputs(batch)
    adapter = adapt(model)
    assert adapter.draws_tokens
    policyc.compile(model, "divprune", ratio="50%")
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        reports = [report_from_last_prefill(model.policyc, inputs["input_ids"], "tiny", row=row,
                                            attention_mask=inputs["attention_mask"]) for row in range(batch)]
        live = model.policyc.runtime.state.live()  # rows keeping fewer tokens carry fillers: not kept
        kept_positions = [k if live is None else k[live[row]] for row, k in enumerate(model.policyc.kept_positions)]
    finally:
        model.policyc.remove()
    first = 0
    for row in range(batch):
        layouts = adapter.image_layouts(inputs, row)
        alone = adapter.image_layouts(single_mistral3(inputs, row))
        assert [v.tokens for i in layouts for v in i.views] == [v.tokens for i in alone for v in i.views]
        positions = (inputs["input_ids"][row] == IMAGE_ID).nonzero().flatten().tolist()
        for k, ((height, width), image) in enumerate(zip(IMAGES[row], layouts, strict=True)):
            [view] = image.views
            assert view.grid == (height // 16, width // 16) and view.pixels.shape == (3, height, width)
            assert torch.equal(view.pixels, inputs["pixel_values"][first + k, :, :height, :width])
            shades = cell_shades(view.tokens, reports[row].kept[0])
            shaded = [c for c, shade in enumerate(shades) if shade == DROPPED]
            behind = [positions[t] for t in view.tokens]
            assert shaded == [c for c, p in enumerate(behind) if p not in kept_positions[row].tolist()]
            assert 0 < len(shaded) < len(behind)
        first += len(layouts)
        path = draw_kept_tokens(tmp_path / f"kept{row}.png", layouts, reports[row].kept, "divprune")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_directory_compiles_from_the_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert_saved_directory_compiles(tiny_mistral3(), tmp_path)
