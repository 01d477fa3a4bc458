"""Published LLM-prefill methods from the standard library against plain references in tests/reference/:
the same kept prompt rows after every stage, the same greedy tokens and logits within 1e-5 (fp32), for
one sample and a left-padded batch of two, then end-to-end `generate()`."""

from __future__ import annotations

import pytest
import torch
from generation import assert_rows_equal_single_runs, assert_same_steps
from reference.mustdrop import mustdrop_generate
from reference.pyramiddrop import pyramiddrop_counts, pyramiddrop_generate
from reference.sparsevlm import sparsevlm_generate
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc.errors import PolicyError

STEPS = 5


def generate(model: torch.nn.Module, inputs: dict, **kwargs: object):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize(("seed", "lam", "batch", "depth"), [(0, 0.5, 1, 24), (1, 0.6, 2, 28), (2, 0.4, 2, 32),
                                                             (3, 0.7, 1, 40), (4, 0.5, 2, 30)])
def test_pyramiddrop_equals_the_reference(seed: int, lam: float, batch: int, depth: int) -> None:
    """The standard library's quarter boundaries (`depth / 4 - 1`, ...) on each depth, rounded down on 30."""
    model = tiny_llava_clip(seed=seed, num_llm_layers=depth)
    layers = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1]
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=5)
    tokens, kept, logits = pyramiddrop_generate(model, **inputs, layers=layers, lam=lam, max_new_tokens=STEPS)
    compiled = policyc.compile(model, "pyramiddrop", {"lam": lam}).policyc
    assert compiled.plan.stages[0].layers == tuple(layers)
    result = generate(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    for row in range(batch):
        for stage, layer in enumerate(layers):  # the rows each layer after a stage processed
            rows = compiled.runtime.kept_at_layer[layer + 1][row]
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


def tokens_at(compiled, layer: int, row: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The prompt positions decoder layer `layer` processed for batch row `row`, without fillers (the rows a
    sample keeping fewer tokens than another carries so that the batch stays rectangular)."""
    rows = compiled.runtime.kept_at_layer[layer][row]
    live = compiled.runtime.live_at_layer.get(layer)
    return rows if live is None else rows[live[row]]


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


@pytest.mark.parametrize(("seed", "batch", "ragged"), [(0, 1, False), (2, 2, False), (3, 2, True), (4, 2, True)])
def test_mustdrop_llm_and_decode_stages_equal_the_reference(seed: int, batch: int, ragged: bool) -> None:
    """`ragged`: the two samples keep different counts (the one keeping fewer carries fillers)."""
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
        for stage, layer in enumerate(PRUNING):  # the tokens each later layer processed (fillers aside)
            rows = tokens_at(compiled, layer + 1, row)
            assert torch.equal(rows[rows >= pad] - pad, reference.kept[stage])
        kept = int(image[row, tokens_at(compiled, 15, row)].sum())
        assert 3 <= kept < 16  # something dropped, something (the key set at least) kept
    assert any(live is not None for live in compiled.runtime.live_at_layer.values()) == ragged
    tokens = torch.stack([r.tokens for r in expected])
    assert_same_steps(result, tokens, torch.stack([torch.stack(r.logits) for r in expected]),
                      inputs["input_ids"].shape[1])


def observed_share(model: torch.nn.Module, inputs: dict, quantile: float) -> float:
    """Halfway between two observed values of `received / sum(received)` at MustDrop's last filter layer, for
    the full standard-library policy with thresholds that drop nothing (every window merged)."""
    policyc.compile(model, policyc.parse("policy w { use mustdrop(similar=-1.0, g_thr=0.0, i_thr=0.0) }"))
    with torch.no_grad():
        model(**inputs)
    state = model.policyc.runtime.state
    image = state.image & state.alive() & state.valid
    received = state.scores["received"]
    shares = torch.cat([(received[b, image[b]] / received[b, image[b]].sum()) for b in range(image.shape[0])]).sort()
    at = int(quantile * (len(shares.values) - 1))
    return float(shares.values[at] + shares.values[at + 1]) / 2


@pytest.mark.parametrize("batch", [1, 2])
def test_mustdrop_runs_end_to_end(batch: int) -> None:
    model = tiny_llava_clip(seed=batch, num_llm_layers=16)
    inputs = make_inputs(model, batch=batch, pad_left=2, text_after=6, seed=batch)
    prompt = inputs["input_ids"].shape[1]
    compiled = policyc.compile(model, "mustdrop").policyc  # 16 random tokens: its thresholds drop nothing
    result = generate(model, inputs)
    assert result.sequences.shape == (batch, prompt + STEPS)
    assert compiled.runtime.image_slots[1].sum(1).tolist() == [2] * batch  # the key set: ceil(8% of 16 patches)
    g_thr = observed_share(model, inputs, 0.5)
    compiled = policyc.compile(model, policyc.parse(
        f"policy w {{ use mustdrop(similar=-1.0, g_thr={g_thr}, i_thr=1.0) }}")).policyc
    result = generate(model, inputs)
    assert result.sequences.shape == (batch, prompt + STEPS)
    image = inputs["input_ids"] == model.config.image_token_id
    before_llm = compiled.runtime.kept_at_layer[0]
    for row in range(batch):
        assert int(image[row, before_llm[row]].sum()) == 8  # the 3x3 window merged into one token
        assert 0 < int(image[row, tokens_at(compiled, 15, row)].sum()) < 8  # the filter dropped some, kept some
        for layer in range(2, 16):  # the output-aware cache holds what survived the last filter layer
            held = result.past_key_values.layers[layer].positions[row, 0]
            assert torch.equal(held[(held >= 0) & (held < prompt)], tokens_at(compiled, 15, row))
    if batch > 1:
        assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, result, STEPS)


TWO_STAGES = """policy p {{
  stage llm.layer[0] {{ keep top 12 of vision by attention(last -> vision)
                        positions {mode} }}
  stage llm.layer[2] {{ keep top 5 of vision by attention(last -> vision)
                        positions {mode} }}
}}"""


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cache_length_without_regather_numbers_as_compact(cache: str) -> None:
    """Without `cache regather` every layer's cache holds the rows it processed, so per-layer cache lengths
    give PyramidDrop's stage-consistent decode positions."""
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    policyc.compile(model, policyc.parse(TWO_STAGES.format(mode="compact")))
    compact = generate(model, inputs)
    policyc.compile(model, policyc.parse(TWO_STAGES.format(mode="cache_length")))
    cache_length = generate(model, inputs, **kwargs)
    assert torch.equal(cache_length.sequences, compact.sequences)
    for a, b in zip(cache_length.scores, compact.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_cache_length_with_regather_on_a_static_cache_equals_the_dynamic_cache() -> None:
    """MustDrop (positions cache_length, then `cache regather`) decodes from static slot layers as from a growing
    cache, on a left-padded batch."""
    model = tiny_llava_clip(seed=0, num_llm_layers=16)
    inputs = make_inputs(model, batch=2, pad_left=2)
    policyc.compile(model, "mustdrop")
    dynamic, static = generate(model, inputs), generate(model, inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_cache_length_under_the_fx_graph_backend_equals_eager() -> None:
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    policy = policyc.parse(TWO_STAGES.format(mode="cache_length"))
    policyc.compile(model, policy)
    eager = generate(model, inputs)
    policyc.compile(model, policy, backend="fx")
    graphs = generate(model, inputs)
    assert torch.equal(graphs.sequences, eager.sequences)
    for a, b in zip(graphs.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2), (2, 2)])
def test_sparsevlm_equals_the_reference(seed: int, batch: int) -> None:
    model = tiny_llava_clip(seed=seed, num_llm_layers=16)  # the standard library's layers 2, 6, 15
    inputs = make_inputs(model, batch=batch, pad_left=3, seed=seed, text_after=8)
    budgets = [10, 6, 3]
    expected = sparsevlm_generate(model, **inputs, pruning=[2, 6, 15], budgets=budgets, max_new_tokens=STEPS)
    compiled = policyc.compile(model, "sparsevlm", early=10, middle=6, late=3, recycle="0%").policyc  # no recycling
    result = generate(model, inputs)
    raters = compiled.runtime.state.sets["raters"]
    for row, reference in enumerate(expected):
        pad = int((inputs["attention_mask"][row] == 0).sum())
        assert torch.equal(raters[row].nonzero().flatten() - pad, reference.raters)
        assert 0 < len(reference.raters) < 8
        for stage, layer in enumerate([3, 7]):
            rows = compiled.runtime.kept_at_layer[layer][row]
            assert torch.equal(rows[rows >= pad] - pad, reference.kept[stage])
        assert torch.equal(compiled.kept_positions[row][compiled.kept_positions[row] >= pad] - pad, reference.kept[2])
    assert_same_steps(result, torch.stack([r.tokens for r in expected]),
                      torch.stack([torch.stack(r.logits) for r in expected]), inputs["input_ids"].shape[1])


@pytest.mark.parametrize(("mode", "cache", "pad"), [("original", "dynamic", 2), ("compact", "static", 2),
                                                    ("cache_length", "dynamic", 2), ("cache_length", "static", 2),
                                                    ("compact", "dynamic", 0), ("original", "static", 0)])
def test_batches_whose_samples_keep_different_counts_equal_single_runs(mode: str, cache: str, pad: int) -> None:
    """A threshold drops a different number of tokens per sample: the sample keeping fewer carries fillers,
    masked everywhere, and generates what it generates alone (with padding, and without: SDPA's implicit
    causal mask made explicit)."""
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=pad, seed=3)
    policyc.compile(model, policyc.parse("policy p { stage llm.layer[0] { score s = attention(last -> vision) } }"))
    with torch.no_grad():
        model(**inputs)
    state = model.policyc.runtime.state
    scores = state.scores["s"][state.image].sort().values
    middle = len(scores) // 2
    threshold = float(scores[middle] + scores[middle + 1]) / 2
    compiled = policyc.compile(model, policyc.parse(f"""policy p {{
      stage llm.layer[0] {{ drop vision where attention(last -> vision) < {threshold}
                            positions {mode} }}
      stage llm.layer[2] {{ keep top 3 of vision by attention(last -> vision)
                            positions {mode} }}
    }}""")).policyc
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    batched = generate(model, inputs, **kwargs)
    assert compiled.runtime.live_at_layer[1] is not None  # the samples kept different counts
    assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, batched, STEPS)


def test_raters_fail_at_compile_time_under_the_graph_backends() -> None:
    model = tiny_llava_clip(num_llm_layers=16)
    with pytest.raises(PolicyError) as caught:
        policyc.compile(model, "sparsevlm", backend="fx")
    assert "merges in the LLM are not implemented by the fx backend yet" in str(caught.value)  # its recycling
    raters_only = "policy p { stage llm.layer[2] { keep top 8 of vision by attention(raters -> vision) } }"
    with pytest.raises(PolicyError) as caught:
        policyc.compile(model, policyc.parse(raters_only), backend="fx")
    assert "the token set `raters` is not implemented by the fx backend yet" in str(caught.value)


def test_images_keeping_different_counts_before_the_llm_equal_single_runs() -> None:
    """An encoder stage keeps a data-dependent number of patches per image (those the CLS token attends to
    more than the mean); then an LLM stage and compact positions."""
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    compiled = policyc.compile(model, policyc.parse("""policy p {
      stage encoder.layer[-2] { drop vision where attention(cls -> vision) < mean(attention(cls -> vision)) }
      stage llm.layer[1] { keep top 3 of vision by attention(last -> vision)
                           positions compact }
    }""")).policyc
    batched = generate(model, inputs)
    kept = compiled.runtime.image_slots[0].sum(1)
    assert kept[0] != kept[1] and bool((kept < 16).all())
    assert compiled.runtime.live_at_layer[0] is not None
    assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, batched, STEPS)
