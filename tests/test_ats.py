"""ATS (`policies/ats.tokpol`: `value_length`, `sample`) against the plain reference `tests/reference/ats.py` on the
tiny CLIP LLaVA: the same kept image slots, projected features and LLM logits within 1e-5, over seeds, layers and
caps, batches of 1 and a padded 2 (seed 1's two images keep 14 and 13 patches); and the sampler on its own."""

from __future__ import annotations

import pytest
import torch
from policyc.passes.select_sample import inverse_transform_picks
from pre_llm_checks import assert_compiled_equals
from reference.ats import ats_image_features, ats_last_logits, sampled_patches
from tiny_models import make_inputs, tiny_llava_clip

from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "first_layer", "share"), [(0, 0, 100), (1, 0, 100), (2, 1, 100),
                                                          (3, 0, 50), (4, 0, 30)])
def test_ats_equals_the_plain_reference(batch: int, seed: int, first_layer: int, share: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    ats_layers = range(first_layer, 2)  # up to the feature layer (1 of 3)
    expected, filled = ats_image_features(model, inputs["pixel_values"], ats_layers, share)
    expected_logits = ats_last_logits(model, inputs, ats_layers, share)
    params = {"first_layer": ir.Number(value=first_layer), "tokens": ir.Percent(value=share)}
    assert_compiled_equals(model, "ats", params, inputs, expected, filled, expected_logits=expected_logits)


@pytest.mark.parametrize("seed", range(6))
def test_the_sampler_equals_the_reference_on_random_scores(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    score = torch.rand(24, generator=generator) ** 4  # skewed, as significance is
    for samples, cap in ((24, 24), (40, 24), (24, 5)):
        picks = inverse_transform_picks(score / score.sum(), samples)[:cap]
        assert sorted(picks.tolist()) == sorted(sampled_patches(score / score.sum(), samples, cap))


def test_the_sampler_keeps_the_heavy_tokens_and_thins_the_flat_ones() -> None:
    score = torch.tensor([0.01] * 10 + [0.3, 0.3, 0.3])
    picks = set(inverse_transform_picks(score / score.sum(), 13).tolist())
    assert {10, 11, 12} <= picks and len(picks) < 13
    assert 0 not in picks  # the least significant token is never picked (its level is 0)


def test_value_length_needs_the_encoder() -> None:
    source = "policy p { stage projector.output { keep sample 50% of vision by value_length } }"
    with pytest.raises(PolicyError, match="value_length"):
        compile_model(tiny_llava_clip(), check_source(source, "p.tokpol")[0])
