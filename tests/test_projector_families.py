"""Projector stages on families whose LLM tokens fold encoder patches (Idefics3/SmolVLM's and InternVL's pixel
shuffle per tile, Gemma 3's 4x4 pooling) or are assembled after the projector (LLaVA-NeXT/OneVision: base view,
unpadded crops, newlines): the stage runs on each image's (tile's) LLM tokens, the LLM then sees the shorter prompt.
Against plain references (tests/reference/before_llm.py, before_llm_gemma3.py): the same kept tokens, the same
generated tokens, logits within 1e-5; padded batches equal their rows alone; what needs one token grid or the
question on anyres images fails clearly. OneVision's videos: tests/test_onevision_video.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from family_checks import assert_batch_equals_single_runs
from reference.before_llm import before_llm_generate, before_llm_run
from reference.before_llm_gemma3 import before_llm_gemma3_run
from reference.divprune import divprune_keep
from reference.pool import pool_features
from tiny_gemma3 import GEMMA_IMAGE_ID, WINDOW, make_gemma3_inputs, single_gemma3, tiny_gemma3
from tiny_idefics3 import make_idefics3_inputs, tiny_idefics3
from tiny_internvl import make_internvl_inputs, tiny_internvl
from tiny_llava_next import IMAGE_ID, make_anyres_inputs, single_row, tiny_anyres

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt

TILINGS = (((2, 2),), ((1, 2), (0, 0)))  # row 0: one image in 2x2 tiles + global view; row 1: 1x2 tiles, unsplit


def _idefics3_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
    return make_idefics3_inputs(batch=batch, images=TILINGS[:batch], pad_left=2 if batch > 1 else 0, seed=seed)


FAMILIES: dict[str, tuple[Callable[..., Any], Callable[..., dict[str, torch.Tensor]]]] = {
    "idefics3": (tiny_idefics3, _idefics3_inputs),
    "smolvlm": (lambda seed: tiny_idefics3(seed, smolvlm=True), _idefics3_inputs),
    "internvl": (tiny_internvl, lambda batch, seed: make_internvl_inputs(batch=batch, pad_left=2, seed=seed)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(("seed", "ratio", "batch"), [(0, 50, 1), (1, 25, 2), (2, 75, 2)])
def test_divprune_per_tile_equals_the_reference(family: str, seed: int, ratio: int, batch: int) -> None:
    build, make = FAMILIES[family]
    model, inputs = build(seed), make(batch, seed)
    adapter = adapt(model)
    tokens = adapter.tokens_per_image
    expected_tokens, expected_kept = before_llm_generate(
        model, inputs, adapter.image_token_id, tokens,
        lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=4)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    image = inputs["input_ids"] == adapter.image_token_id
    live = model.policyc.runtime.state.live()  # None unless rows kept different counts (fillers)
    for row in range(batch):
        kept = model.policyc.kept_positions[row]
        kept = kept if live is None else kept[live[row]]
        assert torch.equal(kept[image[row, kept]], expected_kept[row])
    assert torch.equal(generated, expected_tokens)


@pytest.mark.parametrize("family", ["idefics3", "internvl"])
@pytest.mark.parametrize("policy", ["pool", "grid", "mmtok"])
def test_operators_needing_a_token_grid_or_the_question_fail_at_compile_time(family: str, policy: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(FAMILIES[family][0](0), policy)
    assert f"{family}'s projector stages do not have yet" in str(error.value)


def _divprune(ratio: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0]


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int) -> Any:
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def _assert_kept(model: torch.nn.Module, image: torch.Tensor, expected: list[torch.Tensor]) -> None:
    live = model.policyc.runtime.state.live()  # None unless rows kept different counts (fillers)
    for row, expected_row in enumerate(expected):
        kept = model.policyc.kept_positions[row]
        kept = kept if live is None else kept[live[row]]
        assert torch.equal(kept[image[row, kept]], expected_row)


# Gemma 3: 16 tokens per image (a 4x4 grid of 2x2-pooled patches), two images per row; windows shorter (8) and
# longer (64) than the 45-token prompts.
@pytest.mark.parametrize(("seed", "ratio", "batch", "window"), [
    (0, 50, 1, WINDOW), (1, 25, 2, WINDOW), (2, 75, 2, 64), (3, 40, 2, 24)])
def test_divprune_on_gemma3_equals_the_reference(seed: int, ratio: int, batch: int, window: int) -> None:
    """Kept image tokens still see each other both ways (the reference's masks are Gemma 3's own, checked in
    tests/test_gemma3.py), at renumbered positions."""
    model = tiny_gemma3(seed=seed, window=window)
    inputs = make_gemma3_inputs(batch=batch, images=2, pad_left=2, seed=seed)
    expected_tokens, expected_kept, expected_logits = before_llm_gemma3_run(model, inputs, _divprune(ratio),
                                                                            max_new_tokens=5)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens, logits = _generate(model, inputs, 5)
    _assert_kept(model, inputs["input_ids"] == GEMMA_IMAGE_ID, expected_kept)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("seed", "size", "window"), [(0, 2, WINDOW), (1, 3, 24)])
def test_pool_on_gemma3s_token_grid_equals_the_reference(seed: int, size: int, window: int) -> None:
    """`merge pool` reads Gemma 3's pooled 4x4 token grid: each k x k window's mean in its top-left slot."""
    model = tiny_gemma3(seed=seed, window=window)
    inputs = make_gemma3_inputs(batch=2, images=2, pad_left=2, seed=seed)

    def pool(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, filled = pool_features(features[None], (4, 4), size)
        return filled[0], torch.where(filled[0][:, None], pooled[0], features)

    expected_tokens, expected_kept, expected_logits = before_llm_gemma3_run(model, inputs, pool, max_new_tokens=5)
    policyc.compile(model, "pool", size=size)
    tokens, logits = _generate(model, inputs, 5)
    _assert_kept(model, inputs["input_ids"] == GEMMA_IMAGE_ID, expected_kept)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


ANYRES_IMAGES = {"llava_next": [[(40, 24)], [(30, 64)]], "llava_onevision": [[(64, 64)], [(30, 64), (20, 20)]]}


def _anyres_inputs(family: str, model: torch.nn.Module, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return make_anyres_inputs(model, ANYRES_IMAGES[family][:batch], pad_left=2, seed=seed)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize(("seed", "ratio", "batch"), [(0, 50, 1), (1, 25, 2), (2, 75, 2)])
def test_divprune_on_anyres_equals_the_reference(family: str, seed: int, ratio: int, batch: int) -> None:
    """Each image's tokens (base view, unpadded crops; OneVision's second row: two base-view images) are one
    image for DivPrune; the newline tokens are no candidates and all reach the LLM."""
    model = tiny_anyres(family, seed=seed)
    inputs = _anyres_inputs(family, model, batch, seed)
    with torch.no_grad():
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"], **extra).pooler_output
    sizes, images = [len(f) for f in features], iter(range(len(features)))
    per_row = [[sizes[next(images)] for _ in row] for row in ANYRES_IMAGES[family][:batch]]
    newline = model.model.image_newline.detach()
    expected_tokens, expected_kept, expected_logits = before_llm_run(
        model, inputs, IMAGE_ID, per_row, _divprune(ratio), max_new_tokens=5,
        candidates=lambda f: ~(f == newline).all(-1))
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens, logits = _generate(model, inputs, 5)
    _assert_kept(model, inputs["input_ids"] == IMAGE_ID, expected_kept)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)


PROJECTOR_POLICIES = [("divprune", {"ratio": "30%"}), ("todre", {"ratio": "30%"}), ("random_drop", {"ratio": "40%"})]
GRID_POLICIES = [("pool", {"size": 2}), ("grid", {"ratio": "25%"}), ("mmtok", {"tokens": 6})]


@pytest.mark.parametrize(("policy", "params"), PROJECTOR_POLICIES + GRID_POLICIES)
def test_gemma3_projector_policies_generate_and_batches_equal_single_runs(policy: str, params: dict) -> None:
    model = tiny_gemma3(seed=5)
    inputs = make_gemma3_inputs(batch=2, images=2, pad_left=2, seed=5)
    kept = assert_batch_equals_single_runs(model, policy, params, inputs, single_gemma3, drops=True)
    assert kept is not None


def test_gemma3_images_keeping_different_counts_equal_single_runs() -> None:
    """A mass budget over MMTok's text relevance (the question read before the LLM) keeps a different count per
    row here: the row keeping fewer carries fillers, masked in every layer type's mask (bidirectional image blocks,
    sliding windows)."""
    source = "policy p { stage projector.output { keep top mass(0.7) of vision by text_relevance(tau=0.4) } }"
    model = tiny_gemma3(seed=6)
    inputs = make_gemma3_inputs(batch=2, images=2, pad_left=2, seed=6)
    policyc.compile(model, check_source(source)[0])
    try:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert model.policyc.runtime.state.dead is not None  # the rows kept different counts: fillers
    finally:
        model.policyc.remove()
    assert_batch_equals_single_runs(model, check_source(source)[0], {}, inputs, single_gemma3, drops=True)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize(("policy", "params"), PROJECTOR_POLICIES)
def test_anyres_projector_policies_generate_and_batches_equal_single_runs(family: str, policy: str,
                                                                          params: dict) -> None:
    model = tiny_anyres(family, seed=5)
    assert_batch_equals_single_runs(model, policy, params, _anyres_inputs(family, model, 2, 5), single_row,
                                    drops=True)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("policy", ["pool", "grid", "mmtok"])
def test_anyres_operators_needing_one_token_grid_or_the_question_fail_at_compile_time(family: str,
                                                                                       policy: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_anyres(family), policy)
    text = str(error.value)
    assert f"{family}'s projector stages do not have yet" in text and f"{policy}.tokpol:" in text




@pytest.mark.parametrize("family", ["gemma3", "llava_next"])
def test_a_saved_directory_compiles_divprune_from_the_command_line(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`policyc compile DIR divprune`: the compile report's calibration inputs run the projector stage (LLaVA-NeXT:
    the base view and crops of the sample image, its 4 newlines kept)."""
    from click.testing import CliRunner

    from policyc.cli import main

    model = tiny_gemma3() if family == "gemma3" else tiny_anyres(family)
    model.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "model"), "divprune", "-o", str(tmp_path / "out"),
                                       "--param", "ratio=50%"])
    assert result.exit_code == 0, result.output
    [stage] = json.loads((tmp_path / "out" / "report.json").read_text())["kept"]
    assert (stage["point"], stage["before"], stage["after"]) == \
        ("projector.output", *{"gemma3": (16, 8), "llava_next": (52, 28)}[family])
    assert "tokens kept per stage" in result.output
