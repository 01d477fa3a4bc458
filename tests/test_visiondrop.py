"""VisionDrop (arXiv:2506.22283) from the standard library against the plain reference in
tests/reference/visiondrop.py: the same kept prompt positions after every stage, the same greedy tokens and
logits within 1e-5 (fp32), for one sample and a left-padded batch of two. First the LLM stage alone on the
tiny model's 16 image tokens, then the whole policy (VisionZip before the LLM) with its paper budgets on a
tiny model with 64 image tokens. Also: the graph backends refuse merges in the LLM at compile time."""

from __future__ import annotations

import pytest
import torch
from generation import assert_same_steps
from reference.visiondrop import visiondrop_generate
from tiny_models import _llava, make_inputs, tiny_llava_clip
from transformers import CLIPVisionConfig

import policyc
from policyc.errors import PolicyError

STEPS = 5
LAYERS = [7, 15, 23]
LLM_STAGE = """policy p {
  stage llm.layer[7, 15, 23] as drop {
    let dominant_set = top [8, 6, 4] of vision by attention(vision -> vision, layer=next)
    let rest = vision - dominant_set
    let targets = stride [3, 2, 1] of rest
    merge nearest of rest - targets into targets by keys(layer=next)
    keep dominant_set | targets
    positions compact
  }
}"""


def generate(model: torch.nn.Module, inputs: dict, **kwargs: object):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


def assert_equal_to_reference(model, policy: object, inputs: dict, stages: list[tuple[int, int, int]],  # type: ignore[no-untyped-def]
                              encoder: tuple[int, int] | None = None) -> None:
    tokens, kept, logits = visiondrop_generate(model, **inputs, stages=stages, max_new_tokens=STEPS, encoder=encoder)
    compiled = policyc.compile(model, policy).policyc  # type: ignore[arg-type]
    result = generate(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    for row in range(inputs["input_ids"].shape[0]):
        for stage, (layer, dominant, contextual) in enumerate(stages):  # the rows the layer after a stage processed
            rows = compiled.runtime.kept_at_layer[layer + 1][row]
            assert torch.equal(rows, kept[row][stage])
            assert int(image[row, rows].sum()) == dominant + contextual
    assert_same_steps(result, tokens, logits, inputs["input_ids"].shape[1])


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2), (2, 2), (3, 1)])
def test_the_llm_stage_equals_the_reference(seed: int, batch: int) -> None:
    model = tiny_llava_clip(seed=seed, num_llm_layers=25)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=5)
    stages = [(7, 8, 3), (15, 6, 2), (23, 4, 1)]  # 16 -> 11 -> 8 -> 5 image tokens
    assert_equal_to_reference(model, policyc.parse(LLM_STAGE), inputs, stages)


def tiny_llava_64(seed: int) -> torch.nn.Module:
    """The tiny CLIP LLaVA with a 64x64 image: 64 image tokens, like the embedded default; 25 LLM layers."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                              image_size=64, patch_size=8, projection_dim=32)
    return _llava(vision, seed, 25, "default", -2)


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2)])
def test_the_standard_library_policy_equals_the_reference(seed: int, batch: int) -> None:
    model = tiny_llava_64(seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=5)
    # 48 -> 35 -> 26 -> 19 image tokens after llm.layer[depth / 4 - 1, ...]: 25 layers round down to 5, 11, 17
    stages = [(5, 30, 5), (11, 22, 4), (17, 16, 3)]
    assert_equal_to_reference(model, "visiondrop", inputs, stages, encoder=(42, 6))


@pytest.mark.parametrize("backend", ["inductor", "fx"])
def test_the_graph_backends_refuse_merges_in_the_llm(backend: str) -> None:
    model = tiny_llava_clip(num_llm_layers=25)
    with pytest.raises(PolicyError, match=r"merges in the LLM are not implemented by the .* backend"):
        policyc.compile(model, policyc.parse(LLM_STAGE), backend=backend)


@pytest.mark.parametrize(("merge", "message"), [
    ("merge nearest(combine=mean) of rest into targets by keys", r"combine=mean\) in the LLM"),
    ("merge nearest of rest into targets by hidden", "by features other than keys"),
])
def test_other_llm_merges_fail_at_compile_time(merge: str, message: str) -> None:
    source = f"""policy p {{
  stage llm.layer[2] {{
    let targets = stride 2 of vision
    let rest = vision - targets
    {merge}
    keep targets
  }}
}}"""
    with pytest.raises(PolicyError, match=message):
        policyc.compile(tiny_llava_clip(), policyc.parse(source))


def test_a_static_cache_equals_the_dynamic_one() -> None:
    model = tiny_llava_64(seed=4)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=4)
    policyc.compile(model, "visiondrop")
    dynamic = generate(model, inputs)
    static = generate(model, inputs, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.scores, static.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


RAGGED = """policy p {
  stage llm.layer[3, 7] as drop {
    score s = attention(vision -> vision, layer=next)
    let salient = vision where s > mean(s)
    let rest = vision - salient
    let targets = stride 2 of rest
    merge nearest of rest - targets into targets by keys(layer=next)
    keep salient | targets
    positions compact
  }
}"""


def test_a_batch_whose_samples_keep_different_counts_equals_single_runs() -> None:
    model = tiny_llava_clip(seed=5, num_llm_layers=10)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=5, text_after=5)
    compiled = policyc.compile(model, policyc.parse(RAGGED)).policyc
    batch = generate(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    live = compiled.runtime.live_at_layer[8]
    assert live is not None  # the samples kept different counts: one carries fillers
    counts = [int((image[b, compiled.runtime.kept_at_layer[8][b]] & live[b]).sum()) for b in range(2)]
    assert counts[0] != counts[1]
    length = inputs["input_ids"].shape[1]
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        single = generate(model, {"input_ids": inputs["input_ids"][row : row + 1, real],
                                  "attention_mask": inputs["attention_mask"][row : row + 1, real],
                                  "pixel_values": inputs["pixel_values"][row : row + 1]})
        assert torch.equal(single.sequences[0, int(real.sum()):], batch.sequences[row, length:])
        for a, b in zip(single.scores, batch.scores, strict=True):
            torch.testing.assert_close(a[0], b[row], rtol=0, atol=1e-5)
