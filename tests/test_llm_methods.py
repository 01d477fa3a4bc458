"""Published LLM-prefill methods from the standard library against plain references in tests/reference/:
the same kept prompt rows after every stage, the same greedy tokens and logits within 1e-5 (fp32), for
one sample and a left-padded batch of two, then end-to-end `generate()`."""

from __future__ import annotations

import pytest
import torch
from reference.mustdrop import mustdrop_generate
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


MUSTDROP = """policy p {
  param g_thr = 0.01 in [0, 1]
  param i_thr = 0.01 in [0, 1]

  stage encoder.layer[-1] as key_set {
    let key = top 3 of vision by attention(cls -> vision)
    protect key
  }

  stage llm.layer[2, 6, 10, 14] as filter {
    score received = attention(text -> vision, queries=sum)
    drop vision where received < g_thr * sum(received) and attention(text -> vision, queries=max) < i_thr
    positions cache_length
  }

  stage decode {
    cache regather
  }
}"""
PRUNING = [2, 6, 10, 14]


def mustdrop_thresholds(model: torch.nn.Module, inputs: dict) -> tuple[float, float]:
    """Thresholds that drop some image tokens at the first pruning layer and keep others, halfway between two
    observed scores (so that no score sits on a threshold): the 60% quantile of the text's share, the 80%
    quantile of the strongest single text token's attention."""
    probe = mustdrop_generate(model, **inputs, pruning=PRUNING, g_thr=0.0, i_thr=0.0, key_count=3, max_new_tokens=1)
    shares = torch.cat([r.scores[0][0] for r in probe]).sort().values
    strongest = torch.cat([r.scores[0][1] for r in probe]).sort().values

    def between(values: torch.Tensor, quantile: float) -> float:
        at = int(quantile * (len(values) - 1))
        return float(values[at] + values[at + 1]) / 2

    return between(shares, 0.6), between(strongest, 0.8)


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 1), (2, 2)])
def test_mustdrop_llm_and_decode_stages_equal_the_reference(seed: int, batch: int) -> None:
    model = tiny_llava_clip(seed=seed, num_llm_layers=16)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=6)
    g_thr, i_thr = mustdrop_thresholds(model, inputs)
    expected = mustdrop_generate(model, **inputs, pruning=PRUNING, g_thr=g_thr, i_thr=i_thr, key_count=3,
                                 max_new_tokens=STEPS)
    compiled = policyc.compile(model, policyc.parse(MUSTDROP), g_thr=g_thr, i_thr=i_thr).policyc
    result = generate(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    for row, reference in enumerate(expected):
        pad = int((inputs["attention_mask"][row] == 0).sum())
        for stage, layer in enumerate(PRUNING):
            rows = compiled.runtime.kept_at_layer[layer + 1][row]
            assert torch.equal(rows[rows >= pad] - pad, reference.kept[stage])
        kept = int(image[row, compiled.runtime.kept_at_layer[15][row]].sum())
        assert 3 <= kept < 16  # something dropped, something (the key set at least) kept
    tokens = torch.stack([r.tokens for r in expected])
    assert_same_steps(result, tokens, torch.stack([torch.stack(r.logits) for r in expected]),
                      inputs["input_ids"].shape[1])
