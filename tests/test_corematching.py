"""`cache coactivation` (CoreMatching's token part) against tests/reference/corematching.py: the same core
image tokens in every affected layer's cache, and the same tokens and logits (within 1e-5) at every greedy
step, for one sample and a left-padded batch of two."""

from __future__ import annotations

import pytest
import torch
from reference.cache_loop import Stage
from reference.corematching import corematching_generate
from tiny_models import make_inputs, tiny_llava_clip

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.runtime import compile_model
from policyc.runtime.cache import SlotLayer

STEPS = 4


def compiled(model: torch.nn.Module, options: str):  # type: ignore[no-untyped-def]
    source = f"policy p {{ stage decode {{ cache coactivation({options}) }} }}"
    return compile_model(model, check_source(source, "p.tokpol")[0])


@pytest.mark.parametrize(("seed", "batch", "options", "layers", "reference"), [
    (0, 1, "", [0, 1, 2], -1),  # `scaled`: the code's 5..18 of 32, on 4 layers 0..2
    (1, 2, "reference=-3", [0, 1, 2], -3),
    (2, 2, "first=1, last=-1, reference=-2", [1, 2, 3], -2),
])
def test_coactivation_equals_the_reference(seed: int, batch: int, options: str, layers: list[int],
                                           reference: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    expected, policies = corematching_generate(model, **inputs, layers=layers, reference=reference,
                                               max_new_tokens=STEPS)
    compiled(model, options)
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    length = inputs["input_ids"].shape[1]
    tokens = result.sequences[:, length:]
    evicted = 0
    for row, (wanted, policy) in enumerate(zip(expected, policies, strict=True)):
        assert torch.equal(tokens[row], wanted.tokens)
        for step, logits in zip(result.scores, wanted.scores, strict=True):
            torch.testing.assert_close(step[row], logits, rtol=0, atol=1e-5)
        pad = int((inputs["attention_mask"][row] == 0).sum())
        for index, cached in enumerate(result.past_key_values.layers):
            assert isinstance(cached, SlotLayer)
            held = cached.positions[row, 0]
            held = held[(held >= pad) & (held < length)] - pad
            core = policy.core.get(index, torch.ones(length - pad, dtype=torch.bool))
            assert torch.equal(held, core.nonzero().flatten())  # exactly the reference's core tokens
            evicted += int((~core).sum())
    assert evicted > 0  # the elbow cut dropped image tokens


def test_coactivation_after_a_prefill_stage_equals_the_reference() -> None:
    """A FastV-style stage after layer 1 drops image tokens; layer 2 ranks the ones it still holds."""
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    expected, policies = corematching_generate(model, **inputs, layers=[1, 2, 3], reference=-1,
                                               max_new_tokens=STEPS, stages=[Stage(1, 10)])
    source = """policy p { stage llm.layer[1] { keep top 10 of vision by attention(last -> vision) }
                           stage decode { cache coactivation(first=1, last=3) } }"""
    compile_model(model, check_source(source, "p.tokpol")[0])
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    length = inputs["input_ids"].shape[1]
    for row, (wanted, policy) in enumerate(zip(expected, policies, strict=True)):
        assert torch.equal(result.sequences[row, length:], wanted.tokens)
        for step, logits in zip(result.scores, wanted.scores, strict=True):
            torch.testing.assert_close(step[row], logits, rtol=0, atol=1e-5)
        pad = int((inputs["attention_mask"][row] == 0).sum())
        for index in (2, 3):  # after the stage: the stage's survivors less the non-core ones
            held = result.past_key_values.layers[index].positions[row, 0]
            held = held[(held >= pad) & (held < length)] - pad
            assert torch.equal(held, wanted.caches[index].tokens[0][wanted.caches[index].tokens[0] < length - pad])
            assert bool((~policy.core[index]).any())


def test_coactivation_refuses_layers_the_model_lacks() -> None:
    with pytest.raises(PolicyError, match=r"layers 6\.\.9 name no layer of this 4-layer LLM"):
        compiled(tiny_llava_clip(seed=0), "first=6, last=9")


def test_coactivation_refuses_a_reference_outside_the_prompt() -> None:
    model = tiny_llava_clip(seed=0)
    compiled(model, "reference=-1000")
    with pytest.raises(PolicyError, match="outside a prompt"):
        model.generate(**make_inputs(model), max_new_tokens=2, do_sample=False)


def test_coactivation_on_a_static_cache_equals_the_reference() -> None:
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1)
    expected, _ = corematching_generate(model, **inputs, layers=[0, 1, 2], reference=-1, max_new_tokens=STEPS)
    compiled(model, "")
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, cache_implementation="static")
    for row, wanted in enumerate(expected):
        assert torch.equal(result.sequences[row, inputs["input_ids"].shape[1]:], wanted.tokens)
        for step, logits in zip(result.scores, wanted.scores, strict=True):
            torch.testing.assert_close(step[row], logits, rtol=0, atol=1e-5)
