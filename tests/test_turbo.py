"""Turbo (`policies/turbo.tokpol`, `merge turbo`) against the plain reference `tests/reference/turbo.py` on the tiny
CLIP LLaVA: the same kept image slots, projected features and LLM logits within 1e-5, over seeds, budgets, the
semantic weight, proportional attention, both orders, batches of 1 and a padded 2; the threshold stops merging."""

from __future__ import annotations

import pytest
import torch
from pre_llm_checks import assert_compiled_equals, image_features, literal_params
from reference.turbo import turbo_image_features, turbo_last_logits
from tiny_models import make_inputs, tiny_llava_clip

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.runtime import compile_model


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "r", "alpha", "scale"), [(0, 2, 5, 100), (1, 3, 0.05, 30), (2, 5, 0.2, 30),
                                                            (3, 4, 0, 100)])
def test_turbo_equals_the_plain_reference(batch: int, seed: int, r: int, alpha: float, scale: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    expected, filled = turbo_image_features(model, inputs["pixel_values"], r, alpha, scale, threshold=0)
    expected_logits = turbo_last_logits(model, inputs, r, "spatial", alpha, scale, threshold=0)
    assert_compiled_equals(model, "turbo", literal_params(r=r, alpha=alpha, scale=scale, threshold=0), inputs,
                           expected, filled, expected_logits=expected_logits)


def test_the_semantic_term_changes_which_tokens_merge() -> None:
    model = tiny_llava_clip(seed=1)
    pixel_values = make_inputs(model, seed=1)["pixel_values"]
    plain = turbo_image_features(model, pixel_values, 3, 0, 100, threshold=0)[1]
    informed = turbo_image_features(model, pixel_values, 3, 5, 100, threshold=0)[1]
    assert not torch.equal(plain, informed)


@pytest.mark.parametrize("order", ["spatial", "code"])
def test_turbo_tokens_reach_the_llm_in_the_order_asked(order: str) -> None:
    model = tiny_llava_clip(seed=4)
    inputs = make_inputs(model, batch=2, seed=4)
    expected = turbo_last_logits(model, inputs, 3, order, 0.1, 30, threshold=0)
    compiled = compile_model(model, "turbo", literal_params(r=3, alpha=0.1, scale=30, threshold=0, order=order))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
    finally:
        compiled.remove()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [5, 6])
def test_proportional_attention_equals_the_reference(seed: int) -> None:
    """BLIP's Turbo: log(size) in later attention logits, the CLS score included (it reads that softmax)."""
    model = tiny_llava_clip(seed=seed, num_vision_layers=4, feature_layer=-1)
    pixel_values = make_inputs(model, batch=2, seed=seed)["pixel_values"]
    source = ("policy t { stage encoder.layer[*].attention { merge turbo(r=2, semantic=attention(cls -> vision), "
              "alpha=0.2, scale=30, threshold=0, proportional=true) of vision by keys } }")
    expected, filled = turbo_image_features(model, pixel_values, 2, 0.2, 30, threshold=0, proportional=True)
    compiled = compile_model(model, check_source(source, "t.tokpol")[0])
    try:
        features = image_features(model, pixel_values)
        assert torch.equal(compiled.images.kept, filled)
        torch.testing.assert_close(features[filled], expected[filled], atol=1e-5, rtol=1e-5)
    finally:
        compiled.remove()


def test_below_the_threshold_nothing_merges() -> None:
    model = tiny_llava_clip()
    pixel_values = make_inputs(model)["pixel_values"]
    plain = image_features(model, pixel_values)
    compiled = compile_model(model, "turbo", literal_params(r=3, threshold=18))  # 17 rows (16 patches + CLS) < 18
    try:
        assert torch.equal(image_features(model, pixel_values), plain) and bool(compiled.images.kept.all())
    finally:
        compiled.remove()


def test_turbo_needs_its_semantic_score() -> None:
    source = "policy t { stage encoder.layer[*].attention { merge turbo(r=3) of vision by keys } }"
    with pytest.raises(PolicyError, match="semantic"):
        compile_model(tiny_llava_clip(), check_source(source, "t.tokpol")[0])
