"""Published LLM-prefill methods from the standard library against plain references in tests/reference/:
the same kept prompt rows after every stage, the same greedy tokens and logits within 1e-5 (fp32), for
one sample and a left-padded batch of two, then end-to-end `generate()`."""

from __future__ import annotations

import pytest
import torch
from reference.pyramiddrop import pyramiddrop_counts, pyramiddrop_generate
from tiny_models import make_inputs, tiny_llava_clip

import policyc

STEPS = 5


def generate(model: torch.nn.Module, inputs: dict, **kwargs: object):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


def assert_same_steps(result, tokens: torch.Tensor, logits: torch.Tensor, prompt: int) -> None:  # type: ignore[no-untyped-def]
    assert torch.equal(result.sequences[:, prompt:], tokens)
    for step, expected in enumerate(logits.unbind(1)):
        torch.testing.assert_close(result.scores[step], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("seed", "lam", "batch"), [(0, 0.5, 1), (1, 0.6, 2), (2, 0.4, 2), (3, 0.7, 1)])
def test_pyramiddrop_equals_the_reference(seed: int, lam: float, batch: int) -> None:
    model = tiny_llava_clip(seed=seed, num_llm_layers=25)  # the standard library's layers 7, 15, 23 (+ next)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=5)
    tokens, kept, logits = pyramiddrop_generate(model, **inputs, layers=[7, 15, 23], lam=lam, max_new_tokens=STEPS)
    compiled = policyc.compile(model, "pyramiddrop", {"lam": lam}).policyc
    result = generate(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    for row in range(batch):
        for stage, layer in enumerate([8, 16, 24]):  # the rows each layer after a stage processed
            rows = compiled.runtime.kept_at_layer[layer][row]
            assert torch.equal(rows, kept[row][stage])
            assert int(image[row, rows].sum()) == pyramiddrop_counts(16, lam, 3)[stage]
    assert_same_steps(result, tokens, logits, inputs["input_ids"].shape[1])


def test_pyramiddrop_static_cache_equals_the_dynamic_one() -> None:
    model = tiny_llava_clip(seed=4, num_llm_layers=25)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=4)
    policyc.compile(model, "pyramiddrop", {"lam": 0.6})
    dynamic = generate(model, inputs)
    static = generate(model, inputs, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.scores, static.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
