"""ZipVL (policies/zipvl.tokpol) against the plain reference (tests/reference/zipvl.py): the same kept image
tokens, the same cache entries in every layer after decoding, the same greedy tokens and logits within 1e-5
(fp32), for one sample and a left-padded batch of two; and the `mass(tau)` rule's edge cases."""

from __future__ import annotations

import pytest
import torch
from policyc.passes.schedule_mass import mass_counts, mass_keep
from reference.fastervlm import cls_attention_rows, top_patches
from reference.zipvl import Row, mass_count, zipvl_generate
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model
from policyc.runtime.cache import SlotLayer

STEPS = 7


def _generate(model: torch.nn.Module, inputs: dict):  # type: ignore[no-untyped-def]
    model.generation_config.eos_token_id = None  # the reference decodes every step; token 2 is no stop here
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def _assert_equal(model: torch.nn.Module, compiled, inputs: dict, expected: list[Row],  # type: ignore[no-untyped-def]
                  stage_layers: list[int]) -> None:
    result = _generate(model, inputs)
    length = inputs["input_ids"].shape[1]
    image = inputs["input_ids"] == model.config.image_token_id
    runtime = compiled.runtime
    for row, reference in enumerate(expected):
        pad = int((inputs["attention_mask"][row] == 0).sum())
        assert torch.equal(result.sequences[row, length:], torch.tensor(reference.tokens))
        for step, logits in zip(result.logits, reference.logits, strict=True):
            torch.testing.assert_close(step[row], logits, rtol=0, atol=1e-5)
        for stage, layer in enumerate(stage_layers):  # the image tokens the layer after each stage processed
            rows = runtime.kept_at_layer[layer + 1][row]
            live = runtime.live_at_layer.get(layer + 1)
            rows = rows if live is None else rows[live[row]]
            kept = rows[image[row, rows]] - pad
            assert kept.tolist() == reference.kept[stage]
        for layer, cached in enumerate(result.past_key_values.layers):  # cache entries, prompt and generated
            assert isinstance(cached, SlotLayer)
            held = cached.positions[row, 0]
            assert (held[held >= pad] - pad).tolist() == reference.caches[layer].tokens


@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
@pytest.mark.parametrize(("seed", "tau", "probe", "every"), [(0, 0.5, "all", 2), (1, 0.8, "all", 3),
                                                             (2, 0.95, "text", 2), (3, 0.975, "all", 4),
                                                             (4, 0.3, "text", 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_zipvl_equals_the_reference(build, seed: int, tau: float, probe: str, every: int,  # type: ignore[no-untyped-def]
                                    batch: int) -> None:
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    expected = zipvl_generate(model, **inputs, layers=[1], tau=tau, probe=probe, mass=tau, every=every,
                              max_new_tokens=STEPS)
    params = {"tau": ir.Number(value=tau), "probe": ir.Name(id=probe), "every": ir.Number(value=every)}
    compiled = compile_model(model, "zipvl", params)
    _assert_equal(model, compiled, inputs, expected, [1])
    assert all(len(r.kept[0]) < 16 for r in expected) or tau > 0.9  # the low taus drop image tokens


@pytest.mark.parametrize(("seed", "tau", "mass"), [(5, 0.7, 0.6), (6, 0.9, 0.9)])
@pytest.mark.parametrize("batch", [1, 2])
def test_zipvl_at_two_layers_with_its_own_decode_mass(seed: int, tau: float, mass: float, batch: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=3, seed=seed)
    expected = zipvl_generate(model, **inputs, layers=[1, 2], tau=tau, probe="all", mass=mass, every=2,
                              max_new_tokens=STEPS)
    source = f"""policy p {{
  stage llm.layer[1, 2] {{ keep top mass({tau}) of vision by attention(all -> vision, correct=causal) }}
  stage decode {{ cache importance(mass={mass}, every=2) }}
}}"""
    compiled = compile_model(model, check_source(source, "p.tokpol")[0])
    _assert_equal(model, compiled, inputs, expected, [1, 2])


def test_a_batch_whose_samples_keep_different_counts_matches_each_sample_alone() -> None:
    """Each sample gets its own mass count: here the two samples keep different numbers of image tokens."""
    model = tiny_llava_clip(seed=7)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=7)
    expected = zipvl_generate(model, **inputs, layers=[1], tau=0.6, probe="all", mass=0.6, every=2,
                              max_new_tokens=STEPS)
    assert len(expected[0].kept[0]) != len(expected[1].kept[0])
    compiled = compile_model(model, "zipvl", {"tau": ir.Number(value=0.6), "every": ir.Number(value=2)})
    _assert_equal(model, compiled, inputs, expected, [1])


# ------------------------------------------------------------------ the mass rule


def _counts(scores: list[list[float]], tau: float) -> list[int]:
    values = torch.tensor(scores)
    return mass_counts(values, torch.ones_like(values, dtype=torch.bool), tau).tolist()


def test_mass_one_keeps_every_candidate_even_zero_scores() -> None:
    assert _counts([[0.5, 0.3, 0.2, 0.0]], 1.0) == [4]


def test_a_tiny_mass_keeps_at_least_one() -> None:
    assert _counts([[0.1, 0.7, 0.2]], 1e-9) == [1]
    assert _counts([[0.1, 0.7, 0.2]], 0.0) == [1]


def test_mass_counts_per_row_and_reaches_tau() -> None:
    # 0.5 + 0.3 = 0.8 reaches 0.8 exactly: two; 0.81 needs a third
    assert _counts([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], 0.8) == [2, 2]
    assert _counts([[0.5, 0.3, 0.2], [1.0, 1.0, 2.0]], 0.81) == [3, 3]
    assert _counts([[0.25, 0.25, 0.25, 0.25]], 0.5) == [2]


def test_mass_normalizes_unscaled_scores_and_skips_non_candidates() -> None:
    values = torch.tensor([[5.0, 100.0, 3.0, 2.0]])
    candidates = torch.tensor([[True, False, True, True]])
    assert mass_counts(values, candidates, 0.5).tolist() == [1]  # 5 of 10
    assert mass_keep(values, candidates, 0.6).tolist() == [[True, False, True, False]]


def test_mass_ties_go_to_the_earlier_token() -> None:
    values = torch.tensor([[1.0, 2.0, 2.0, 2.0, 1.0]])
    kept = mass_keep(values, torch.ones_like(values, dtype=torch.bool), 0.5)  # 4 of 8: two of the three 2s
    assert kept.tolist() == [[False, True, True, False, False]]


def test_mass_of_all_zero_scores_keeps_everything_and_negative_scores_fail() -> None:
    assert _counts([[0.0, 0.0, 0.0]], 0.5) == [3]
    with pytest.raises(PolicyError, match="non-negative"):
        _counts([[0.5, -0.1]], 0.5)


def test_the_reference_mass_rule_agrees_with_the_runtime_one() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        values = torch.rand(1, 12, generator=generator) ** 3
        for tau in (0.1, 0.5, 0.9, 0.99, 1.0):
            assert _counts(values.tolist(), tau) == [mass_count(values[0].tolist(), tau)]


def test_mass_needs_a_score_it_can_rank() -> None:
    model = tiny_llava_clip()
    source = "policy p {\n  stage llm.layer[1] { keep top mass(0.9) of vision by key_norm - 100 }\n}"
    compiled = compile_model(model, check_source(source, "p.tokpol")[0])
    try:
        with pytest.raises(PolicyError, match="non-negative"), torch.no_grad():
            model(**make_inputs(model))
    finally:
        compiled.remove()


@pytest.mark.parametrize(("seed", "tau"), [(0, 0.5), (1, 0.5), (3, 0.7)])
def test_mass_before_the_llm_keeps_each_images_own_count(seed: int, tau: float) -> None:
    """`top mass(tau)` in an encoder stage, by FasterVLM's CLS attention (tests/reference/fastervlm.py) to the
    fourth power (sharper than the tiny models' near-uniform attention): each image keeps the count the
    reference mass rule gives its own scores, and here the two images' counts differ."""
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=2, seed=seed)
    expected, counts = [], []
    with torch.no_grad():
        for image in inputs["pixel_values"]:
            attention = cls_attention_rows(model, image)[1][-1]
            score = attention * attention * attention * attention
            counts.append(mass_count(score.tolist(), tau))
            chosen = top_patches(score, counts[-1])
            expected.append([i in chosen for i in range(len(score))])
    assert counts[0] != counts[1]
    source = f"""policy p {{
  stage encoder.layer[-2] {{
    score a = attention(cls -> vision)
    keep top mass({tau}) of vision by a * a * a * a
  }}
}}"""
    compiled = compile_model(model, check_source(source, "p.tokpol")[0])
    try:
        with torch.no_grad():
            model(**inputs)
        assert compiled.runtime.image_slots[0].tolist() == expected
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    finally:
        compiled.remove()
