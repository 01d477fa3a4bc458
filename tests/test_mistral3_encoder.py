"""ToMe in Mistral 3's packed Pixtral tower (policyc/runtime/pixtral_tower.py): merges within each image of the packed
sequence, unmerged before the projector's 2x2 patch merger, against the plain reference (tests/reference/
tome_pixtral.py): the same merged groups, rows per layer and logits; padded batches equal single runs.

`policyc.compile(model, "tome", r=r)` installs it: ImageStages (policyc/runtime/vision.py) takes the adapter's
`packed_encoder`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from reference.tome_pixtral import tome_pixtral_features, with_projector_input
from tiny_mistral3 import make_mistral3_inputs, single_mistral3, tiny_mistral3

import policyc
from policyc.runtime.pixtral_tower import PixtralEncoder
from policyc.runtime.vision import ImageStages

IMAGES = [[(48, 64)], [(32, 48), (64, 32)]]


@contextmanager
def tome_installed(model: torch.nn.Module, r: int) -> Iterator[ImageStages]:
    """The standard library's ToMe (`r` merges per image and layer) compiled onto `model`; yields the compiled
    model's ImageStages (`merged_into`, `encoder_rows` after each forward)."""
    policyc.compile(model, "tome", r=r)
    try:
        stages = model.policyc.images
        assert isinstance(stages._packed, PixtralEncoder)
        yield stages
    finally:
        model.policyc.remove()
        del model.policyc


def _groups(merged_into: torch.Tensor) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for position, holder in enumerate(merged_into.tolist()):
        groups.setdefault(holder, []).append(position)
    return sorted(groups.values())


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-5 of the logits' scale (std-0.2 weights: logits reach ~6)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * max(float(expected.abs().max()), 1.0))


def test_the_reference_without_merges_is_the_model() -> None:
    model = tiny_mistral3(seed=1)
    inputs = make_mistral3_inputs(IMAGES, seed=1)
    features, groups, rows = tome_pixtral_features(model, inputs["pixel_values"], inputs["image_sizes"], 0)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    _close(with_projector_input(model, inputs, features), expected)
    assert rows == [[12 * 4] * 2, [6 * 4] * 2, [8 * 4] * 2]
    assert all(len(group) == 1 for image in groups for group in image)


@pytest.mark.parametrize(("seed", "r", "batch"), [(0, 2, 1), (1, 5, 2), (2, 30, 2), (3, 1, 2)])
def test_tome_equals_the_reference(seed: int, r: int, batch: int) -> None:
    """Per image of the packed sequence (images of different sizes in one prompt and across a batch): the same
    merged groups, rows per layer and logits; r=30 merges as many pairs as each image allows (half its rows)."""
    model = tiny_mistral3(seed=seed)
    inputs = make_mistral3_inputs(IMAGES[:batch], seed=seed)
    features, groups, rows = tome_pixtral_features(model, inputs["pixel_values"], inputs["image_sizes"], r)
    expected = with_projector_input(model, inputs, features)
    with tome_installed(model, r) as stages, torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    assert _groups(stages.merged_into) == sorted(group for image in groups for group in image)
    assert stages.encoder_rows is not None and stages.encoder_rows.tolist() == rows
    assert any(len(group) > 1 for image in groups for group in image)
    _close(logits, expected)


def test_tome_batches_equal_single_runs_and_remove_restores_the_model() -> None:
    """Greedy generate() with ToMe in the tower: a left-padded batch (rows with other image sizes and counts) gives
    each row's tokens and scores alone; removing the encoder gives the unmodified model back."""
    model = tiny_mistral3(seed=4)
    inputs = make_mistral3_inputs(IMAGES, seed=4)
    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
    with tome_installed(model, 4):
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        for row in range(2):
            alone = model.generate(**single_mistral3(inputs, row), max_new_tokens=4, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
            assert torch.equal(batched.sequences[row, -4:], alone.sequences[0, -4:])
            for a, b in zip(batched.scores, alone.scores, strict=True):
                _close(a[row], b[0])
    with torch.no_grad():
        assert torch.equal(model(**inputs, use_cache=False).logits, plain)
