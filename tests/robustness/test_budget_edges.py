"""Budget edge cases: each works as documented (compared with the unmodified model or a plain
expectation) or fails with a clear error; none gives a silently different model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN_ID, make_inputs, tiny_llava_clip

from policyc.lang import check_source, check_stdlib
from policyc.runtime import compile_model


def policy(body: str):  # type: ignore[no-untyped-def]
    return check_source(f"policy p {{ {body} }}", "p.tokpol")[0]


def greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 4) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1]:]


LLM_KEEP = "stage llm.layer[1] {{ keep top {amount} of vision by attention(last -> vision) }}"
PRE_KEEP = "stage projector.output {{ keep top {amount} of vision by random(seed=1) }}"
ENCODER_KEEP = "stage encoder.layer[0] {{ keep top {amount} of vision by key_norm }}"


@pytest.mark.parametrize("stage", [LLM_KEEP, PRE_KEEP])
@pytest.mark.parametrize("batch", [1, 2])
def test_keep_more_than_exists_keeps_everything_bit_exactly(stage: str, batch: int) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=batch, pad_left=2 if batch > 1 else 0)
    expected = greedy(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    compiled = compile_model(model, policy(stage.format(amount=1000)))
    try:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(greedy(model, inputs), expected)
    finally:
        compiled.remove()


@pytest.mark.parametrize("stage", [LLM_KEEP, PRE_KEEP])
@pytest.mark.parametrize("amount", ["0", "0%", "1"])
def test_keep_nothing_or_one_token_drops_the_rest_and_still_generates(stage: str, amount: str) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=2)
    compiled = compile_model(model, policy(stage.format(amount=amount)))
    try:
        tokens = greedy(model, inputs)
        assert tokens.shape == (2, 4)
        image = inputs["input_ids"] == IMAGE_TOKEN_ID
        kept = compiled.kept_positions
        for row in range(2):
            assert int(image[row, kept[row]].sum()) == (1 if amount == "1" else 0)
            assert bool(torch.isin((~image[row]).nonzero().flatten(), kept[row]).all())  # every text token stays
    finally:
        compiled.remove()


@pytest.mark.parametrize("stage", [LLM_KEEP, PRE_KEEP, ENCODER_KEEP])
def test_a_prompt_without_an_image_runs_unchanged(stage: str) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=1)
    text = {"input_ids": inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, 5),
            "attention_mask": inputs["attention_mask"]}
    expected = greedy(model, text)
    compiled = compile_model(model, policy(stage.format(amount="50%")))
    try:
        assert torch.equal(greedy(model, text), expected)
    finally:
        compiled.remove()


def test_no_question_after_the_image_gives_text_signals_nothing_to_drop_on() -> None:
    """`text` is empty when nothing follows the image: text-guided scores are 0 and a share-based keep
    still keeps its share (ties go to the earlier token)."""
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=1, text_after=0)
    compiled = compile_model(model, policy(
        "stage llm.layer[1] { keep top 25% of vision by attention(text -> vision) }"))
    try:
        tokens = greedy(model, inputs)
        assert tokens.shape == (1, 4)
        image = inputs["input_ids"][0] == IMAGE_TOKEN_ID
        kept = compiled.kept_positions[0]
        assert kept[image[kept]].tolist() == image.nonzero().flatten()[:4].tolist()
    finally:
        compiled.remove()


def test_a_long_prompt_runs() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, text_after=600, pad_left=3)
    compiled = compile_model(model, policy(LLM_KEEP.format(amount="50%")))
    try:
        assert greedy(model, inputs, 2).shape == (2, 2)
        image = inputs["input_ids"] == IMAGE_TOKEN_ID
        assert [int(image[r, compiled.kept_positions[r]].sum()) for r in range(2)] == [8, 8]
    finally:
        compiled.remove()


def test_images_of_different_sizes_in_one_batch() -> None:
    """The processor brings every image to the encoder's size; each row of the batch then keeps what it keeps
    alone (FastV on the embedded default model, through its processor and chat template)."""
    from generation import assert_rows_equal_single_runs
    from PIL import Image

    from policyc.models.random_tiny import random_model, random_processor

    model, processor = random_model(banner=False), random_processor()
    generator = torch.Generator().manual_seed(0)
    images = [Image.frombytes("RGB", (w, h), bytes(torch.randint(0, 256, (h * w * 3,), generator=generator,
                                                                 dtype=torch.uint8).tolist()))
              for w, h in ((50, 40), (200, 90))]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
               "text": text}]}], add_generation_prompt=True) for text in ("what is it ?", "and where is the red one ?")]
    inputs = dict(processor(images=images, text=prompts, padding=True, return_tensors="pt"))
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    compiled = compile_model(model, check_source(
        "policy p { stage llm.layer[1] { keep top 25% of vision by attention(last -> vision) } }")[0])
    def scored(x: dict) -> object:
        return model.generate(**x, max_new_tokens=4, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)

    try:
        assert_rows_equal_single_runs(scored, inputs, scored(inputs), 4)
    finally:
        compiled.remove()


@pytest.fixture(scope="module")
def one_token_model() -> torch.nn.Module:
    """A LLaVA whose image is one 8x8 patch: every image is a single image token (24 encoder layers, 32 LLM
    layers, so every standard-library policy's layers exist)."""
    return tiny_llava_clip(num_vision_layers=24, num_llm_layers=32, image_size=8)


@pytest.mark.parametrize("name", sorted(check_stdlib()))
def test_every_stdlib_policy_runs_on_a_single_image_token(one_token_model: torch.nn.Module, name: str) -> None:
    """One image token: share-based budgets truncate to int(share x 1) = 0 kept tokens (as the papers' codes
    do), count budgets keep it; either way generation runs and every text token reaches the LLM."""
    model = one_token_model
    inputs = make_inputs(model, batch=2, pad_left=2)
    image = inputs["input_ids"] == IMAGE_TOKEN_ID
    assert image.sum(dim=1).tolist() == [1, 1]
    compiled = compile_model(model, check_stdlib()[name])
    try:
        assert greedy(model, inputs, 3).shape == (2, 3)
        kept = compiled.kept_positions
        for row in range(2):
            assert bool(torch.isin((~image[row]).nonzero().flatten(), kept[row]).all())
            assert int(image[row, kept[row]].sum()) <= 1
    finally:
        compiled.remove()
