"""The LLM side of encoder and projector stages: image tokens the pre-LLM stages did not keep are
dropped at the LLM's input, which must equal a prompt whose `<image>` runs hold only the kept tokens
(contiguous positions), alone and before later LLM stages, with dynamic and static caches.

The kept image slots come from the plain random-drop reference (tests/reference/random_drop.py) and
are handed to the runtime the way the pre-LLM stages hand theirs: `runtime.images.kept`, [I, N].
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from reference.fastv import _fastv_row, eager_copy, prompt_embeddings
from reference.random_drop import random_drop_generate, random_keep
from test_runtime import assert_static_matches_dynamic, policy
from tiny_models import IMAGE_TOKEN_ID, make_inputs, tiny_llava_clip

from policyc.errors import PolicyError
from policyc.runtime import compile_model

# A stage at layer 0 that keeps everything: it makes the runtime wrap every decoder layer.
PASS_THROUGH = "policy p { stage llm.layer[0] { keep top 100% of vision by attention(last -> vision) } }"
FASTV_AFTER = """policy p {
  stage llm.layer[0] { keep top 100% of vision by attention(last -> vision) }
  stage llm.layer[1] { keep top 50% of vision by attention(last -> vision) }
}"""


@dataclass
class KeptSlots:
    """The pre-LLM stages' hand-off (policyc.runtime.compiled.ImageSource), filled by the test."""

    kept: torch.Tensor | None = None
    protected: torch.Tensor | None = None


def slots_from_rows(input_ids: torch.Tensor, kept_rows: list[torch.Tensor], per_image: int) -> torch.Tensor:
    """Per-row kept prompt indices -> [I, N] kept image slots, images in row-major order."""
    slots = [torch.isin((row == IMAGE_TOKEN_ID).nonzero().flatten(), kept) for row, kept in zip(input_ids, kept_rows,
                                                                                                  strict=True)]
    return torch.cat(slots).view(-1, per_image)


def greedy(model: torch.nn.Module, inputs: dict, steps: int, **options: object):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **options)


@pytest.mark.parametrize("batch", [1, 2])
def test_drop_before_the_llm_equals_the_shrunk_prompt(batch: int) -> None:
    model = tiny_llava_clip(seed=4)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=5)
    expected, kept_rows = random_drop_generate(model, **inputs, fraction=0.25, seed=7, max_new_tokens=6)
    compiled = compile_model(model, policy(PASS_THROUGH))
    compiled.runtime.images = images = KeptSlots()
    images.kept = slots_from_rows(inputs["input_ids"], kept_rows, 16)
    result = greedy(model, inputs, 6)
    assert torch.equal(result.sequences[:, -6:], expected)
    assert images.kept is None, "the prefill takes the hand-off, so a later prompt cannot reuse it"
    kept = compiled.kept_positions
    for row in range(batch):
        text = (inputs["input_ids"][row] != IMAGE_TOKEN_ID).nonzero().flatten()
        assert torch.equal(kept[row], torch.sort(torch.cat([text, kept_rows[row]])).values)


def test_drop_before_the_llm_then_fastv_equals_fastv_on_the_shrunk_prompt() -> None:
    model = tiny_llava_clip(seed=2)
    inputs = make_inputs(model, batch=1, seed=3)
    kept_rows = random_keep(inputs["input_ids"], IMAGE_TOKEN_ID, [16], 0.5, seed=1)
    ref = eager_copy(model)
    with torch.no_grad():
        embeds, _ = prompt_embeddings(ref, inputs["input_ids"], inputs["pixel_values"])
    ids = inputs["input_ids"][0]
    rows = torch.sort(torch.cat([(ids != IMAGE_TOKEN_ID).nonzero().flatten(), kept_rows[0]])).values
    with torch.no_grad():
        expected, _ = _fastv_row(ref, embeds[0, rows], torch.ones(len(rows), dtype=torch.bool),
                                 ids[rows] == IMAGE_TOKEN_ID, layer=1, keep=0.5, max_new_tokens=6)
    compiled = compile_model(model, policy(FASTV_AFTER))
    compiled.runtime.images = images = KeptSlots()
    images.kept = slots_from_rows(inputs["input_ids"], kept_rows, 16)
    assert torch.equal(greedy(model, inputs, 6).sequences[0, -6:], expected)
    assert compiled.kept_positions.shape[1] == len(rows) - 4  # FastV kept half of the 8 image tokens left


class EveryPrompt:
    """Hands the same kept slots to every prefill, as one vision forward per prompt would."""

    protected = None

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots

    @property
    def kept(self) -> torch.Tensor:
        return self.slots

    @kept.setter
    def kept(self, taken: None) -> None:
        """The runtime takes the hand-off at each prefill; the next prompt gets the same slots again."""


def test_static_cache_matches_dynamic_after_a_drop_before_the_llm() -> None:
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=2)
    kept_rows = random_keep(inputs["input_ids"], IMAGE_TOKEN_ID, [16, 16], 0.5, seed=3)
    compiled = compile_model(model, policy(FASTV_AFTER))
    compiled.runtime.images = EveryPrompt(slots_from_rows(inputs["input_ids"], kept_rows, 16))
    assert_static_matches_dynamic(model, inputs)


def test_hand_off_that_does_not_fit_the_prompt_fails_loudly() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=1)
    compiled = compile_model(model, policy(PASS_THROUGH))
    compiled.runtime.images = images = KeptSlots()
    images.kept = torch.ones(1, 16, dtype=torch.bool)  # one image's worth for a prompt with two
    with pytest.raises(PolicyError, match="the prompt holds 32 image tokens but the images gave 1 x 16"):
        greedy(model, inputs, 2)
    # (Images keeping different counts are supported: tests/test_llm_methods.py, fillers.)
