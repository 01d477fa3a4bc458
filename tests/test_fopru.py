"""FoPru (policies/fopru.tokpol: `logit_significance` and the `focal` selector) against the plain reference
tests/reference/fopru.py: the same kept image slots exactly, projected features and the LLM's last logits within
1e-5, both strategies, the three significance directions, CLIP (CLS removed) and SigLIP, batches of 1 and a left-
padded 2; and the checker's errors for the new selector."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pre_llm_checks import assert_compiled_equals
from reference.fopru import fopru_image_features
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source, ir


def assert_fopru_equals_reference(model: torch.nn.Module, percent: int, strategy: str, direction: str, batch: int,
                                  seed: int) -> torch.Tensor:
    """Compiles fopru (with `direction` written into the policy) and checks it against the reference on a batch
    whose rows after the first are left-padded; returns the kept slots [I, N]."""
    inputs = make_inputs(model, batch=batch, seed=seed, pad_left=2)
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    expected, filled = fopru_image_features(model, inputs["pixel_values"], patches * percent // 100, strategy,
                                            direction)
    text = FOPRU.replace("by logit_significance", f"by logit_significance(direction={direction})")
    policy = check_source(text, "fopru.tokpol")[0]
    params = {"ratio": ir.Percent(value=percent), "strategy": ir.Name(id=strategy)}
    return assert_compiled_equals(model, policy, params, inputs, expected, filled)


FOPRU = (Path(__file__).parents[1] / "policies" / "fopru.tokpol").read_text(encoding="utf-8")

Build = Callable[..., torch.nn.Module]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("build", "seed", "percent", "direction"), [
    (tiny_llava_clip, 0, 25, "auto"), (tiny_llava_clip, 1, 19, "auto"), (tiny_llava_clip, 2, 50, "received"),
    (tiny_llava_siglip, 3, 25, "auto"), (tiny_llava_siglip, 4, 44, "given"),
])
def test_fopru_rank_equals_the_plain_reference(build: Build, seed: int, percent: int, direction: str,
                                               batch: int) -> None:
    kept = assert_fopru_equals_reference(build(seed=seed), percent, "rank", direction, batch, seed)
    assert kept.sum(1).tolist() == [16 * percent // 100] * batch


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("build", "seed", "percent", "direction"), [
    (lambda seed: tiny_llava_clip(seed=seed, image_size=48), 0, 50, "auto"),
    (lambda seed: tiny_llava_clip(seed=seed, image_size=48), 1, 30, "given"),
    (tiny_llava_clip, 2, 50, "auto"),
    (tiny_llava_siglip, 3, 25, "received"),
])
def test_fopru_row_keeps_whole_grid_rows_as_the_plain_reference(build: Build, seed: int, percent: int,
                                                                  direction: str, batch: int) -> None:
    model = build(seed=seed)
    width = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kept = assert_fopru_equals_reference(model, percent, "row", direction, batch, seed)
    grid = kept.reshape(batch, width, width)
    assert bool((grid.all(2) | ~grid.any(2)).all())  # whole rows only
    assert grid.all(2).sum(1).tolist() == [width * percent // 100] * batch


def test_the_auto_direction_is_one_of_the_two_vectors_per_image() -> None:
    """Over a few seeds the code's variance rule picks each of the two vectors at least once (so both paths of the
    equivalence test above are exercised)."""
    picks = set()
    for seed in range(6):
        model = tiny_llava_clip(seed=seed)
        pixel_values = make_inputs(model, seed=seed)["pixel_values"]
        _, auto = fopru_image_features(model, pixel_values, 4)
        _, received = fopru_image_features(model, pixel_values, 4, direction="received")
        _, given = fopru_image_features(model, pixel_values, 4, direction="given")
        picks.update(name for name, kept in (("received", received), ("given", given)) if torch.equal(auto, kept))
    assert picks == {"received", "given"}


@pytest.mark.parametrize(("text", "message"), [
    ("keep focal(strategy=rows) 25% of vision by logit_significance", "must be one of rank, row"),
    ("keep focal 25% of vision", "expected .by."),
    ("keep top 25% of vision by logit_significance(direction=both)", "must be one of auto, received, given"),
])
def test_fopru_operators_fail_clearly_in_the_checker(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        check_source(f"policy p {{\n  stage encoder.layer[-2] {{\n    {text}\n  }}\n}}\n", "p.tokpol")


def test_logit_significance_is_an_encoder_signal() -> None:
    text = "policy p {\n  stage llm.layer[1] {\n    keep top 25% of vision by logit_significance\n  }\n}\n"
    with pytest.raises(PolicyError, match="'logit_significance' is not available in an LLM stage"):
        check_source(text, "p.tokpol")
