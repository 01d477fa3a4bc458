"""Projector stages on families whose LLM tokens fold encoder patches per tile (Idefics3/SmolVLM's and InternVL's
pixel shuffle): each tile's tokens are one image for the stage; the LLM then sees the shorter prompt. Against a
plain reference (tests/reference/before_llm.py): the same kept tokens and generated tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from reference.before_llm import before_llm_generate
from reference.divprune import divprune_keep
from tiny_idefics3 import make_idefics3_inputs, tiny_idefics3
from tiny_internvl import make_internvl_inputs, tiny_internvl

import policyc
from policyc.errors import PolicyError
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
