"""Decode-stage cache policies against plain references (tests/reference/{h2o,snapkv,streamingllm,
regather}.py: a hand-run Llama decoder with an explicit per-head cache): the same tokens and scores at
every greedy step, for one sample and a left-padded batch of two, with budgets small enough to evict."""

from __future__ import annotations

import pytest
import torch
from generation import assert_rows_equal_single_runs
from reference.cache_loop import Stage, cache_generate
from reference.fastv import eager_copy
from reference.h2o import h2o_generate
from reference.regather import regather_generate
from reference.snapkv import SnapKV, snapkv_generate
from reference.streamingllm import streaming_generate
from tiny_models import make_inputs, tiny_llava_clip

from policyc.lang import check_source
from policyc.lang.build import parse_value
from policyc.runtime import compile_model
from policyc.runtime.cache import SlotLayer

STEPS = 8


def generate(model: torch.nn.Module, inputs: dict, **kwargs: object):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


def compiled(model: torch.nn.Module, body: str):  # type: ignore[no-untyped-def]
    return compile_model(model, check_source(f"policy p {{\n{body}\n}}", "p.tokpol")[0])


def assert_matches(result, expected, inputs: dict) -> None:  # type: ignore[no-untyped-def]
    tokens = result.sequences[:, inputs["input_ids"].shape[1]:]
    for row, reference in enumerate(expected):
        assert torch.equal(tokens[row], reference.tokens)
        for step, logits in zip(result.scores, reference.scores, strict=True):
            torch.testing.assert_close(step[row], logits, rtol=0, atol=1e-4)


def cache_lengths(result) -> list[int]:  # type: ignore[no-untyped-def]
    return [layer.keys.shape[-2] for layer in result.past_key_values.layers]


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("per_head", [True, False])
def test_heavy_hitter_equals_h2o(seed: int, batch: int, per_head: bool) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    expected = h2o_generate(model, **inputs, heavy=4, recent=3, per_head=per_head, max_new_tokens=STEPS)
    flag = "true" if per_head else "false"
    compiled(model, f"stage decode {{ cache heavy_hitter(heavy=4, recent=3, per_head={flag}) }}")
    result = generate(model, inputs)
    assert_matches(result, expected, inputs)
    assert cache_lengths(result) == [7] * 4  # heavy + recent after every step: eviction happened


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (3, 2)])
def test_sink_window_equals_streamingllm(seed: int, batch: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=3, seed=seed)
    expected = streaming_generate(model, **inputs, sinks=2, window=6, max_new_tokens=STEPS)
    compiled(model, "stage decode { cache sink_window(sinks=2, window=6) }")
    result = generate(model, inputs)
    assert_matches(result, expected, inputs)
    assert cache_lengths(result) == [7] * 4


@pytest.mark.parametrize(("seed", "batch", "pool"), [(0, 1, "max"), (1, 2, "avg"), (4, 2, "max")])
def test_snapkv_equals_the_reference(seed: int, batch: int, pool: str) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    expected = snapkv_generate(model, **inputs, window=3, capacity=10, kernel=3, pool=pool, max_new_tokens=STEPS)
    compiled(model, f"stage decode {{ cache snapkv(window=3, capacity=10, kernel=3, pool={pool}) }}")
    result = generate(model, inputs)
    assert_matches(result, expected, inputs)
    assert cache_lengths(result) == [10 + STEPS - 1] * 4


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2)])
def test_regather_equals_mustdrops_output_aware_cache(seed: int, batch: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    expected = regather_generate(model, **inputs, stages=[Stage(1, 10), Stage(2, 5)], max_new_tokens=STEPS)
    compiled(model, """stage llm.layer[1] { keep top 10 of vision by attention(last -> vision) }
                       stage llm.layer[2] { keep top 5 of vision by attention(last -> vision) }
                       stage decode { cache regather }""")
    result = generate(model, inputs)
    assert_matches(result, expected, inputs)
    length = inputs["input_ids"].shape[1]
    for row, reference in enumerate(expected):  # every layer holds the reference's prompt tokens
        pad = int((inputs["attention_mask"][row] == 0).sum())
        for layer, cached in enumerate(result.past_key_values.layers):
            wanted = reference.caches[layer].tokens[0]
            if isinstance(cached, SlotLayer):
                held = cached.positions[row, 0]
            else:  # before the first stage: MustDrop keeps the full cache
                assert layer == 0
                held = torch.arange(length)
            assert torch.equal(held[(held >= pad) & (held < length)] - pad, wanted[wanted < length - pad])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cache", ["full", "heavy_hitter(heavy=100, recent=100)", "sink_window(sinks=4, window=200)",
                                   "snapkv(window=4, capacity=500)", "regather"])
def test_full_cache_and_budgets_that_never_evict_are_bit_exact(batch: int, cache: str) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=batch, pad_left=2)
    reference = generate(model, inputs)
    compiled_model = compiled(model, f"stage decode {{ cache {cache} }}")
    result = generate(model, inputs)
    assert torch.equal(result.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(result.scores, reference.scores, strict=True))
    compiled_model.remove()
    assert all(not isinstance(layer, SlotLayer) for layer in generate(model, inputs).past_key_values.layers)


def test_protected_tokens_are_never_evicted() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=2)
    compiled_model = compiled(model, """stage llm.layer[0] { protect top 5 of vision by attention(last -> vision) }
                                        stage decode { cache heavy_hitter(heavy=2, recent=2) }""")
    result = generate(model, inputs)
    protected = compiled_model.runtime.state.protected
    assert int(protected.sum()) == 10
    for layer in result.past_key_values.layers:
        for row in range(2):
            wanted = protected[row].nonzero().squeeze(1)
            for head in range(layer.positions.shape[1]):
                assert torch.isin(wanted, layer.positions[row, head]).all()
            assert int((layer.positions[row] >= 0).sum(-1).max()) <= 5 + 4  # protected + heavy + recent
    assert cache_lengths(result)[0] < inputs["input_ids"].shape[1]


def test_left_padded_batch_equals_single_runs_with_percent_budgets() -> None:
    model = tiny_llava_clip(seed=5)
    inputs = make_inputs(model, batch=2, pad_left=4, text_before=6, seed=5)
    expected = h2o_generate(model, **inputs, heavy=0.2, recent=0.15, max_new_tokens=STEPS)
    compile_model(model, "h2o", {"heavy": parse_value("20%"), "recent": parse_value("15%")})
    batched = generate(model, inputs)
    assert_matches(batched, expected, inputs)
    assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, batched, STEPS)


@pytest.mark.parametrize(("name", "overrides"), [("h2o", {"heavy": "10%", "recent": "10%"}),
                                                  ("snapkv", {"window": "16", "capacity": "128"}),
                                                  ("streamingllm", {"sinks": "2", "window": "64"})])
def test_standard_library_cache_policies_generate(name: str, overrides: dict[str, str]) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=2)
    reference = generate(model, inputs)
    compile_model(model, name, {k: parse_value(v) for k, v in overrides.items()})
    result = generate(model, inputs)
    assert result.sequences.shape == reference.sequences.shape
    assert torch.equal(result.scores[0], reference.scores[0])  # prefill is untouched
    if name == "h2o":  # 20% of a ~23-token prompt: evicting changes the later steps
        assert cache_lengths(result) == [4] * 4


def test_pyramiddrop_snapkv_compiles_and_generates() -> None:
    model = tiny_llava_clip(num_llm_layers=25)
    inputs = make_inputs(model, batch=2, pad_left=2)
    pyramiddrop = compile_model(model, "pyramiddrop")
    alone = generate(model, inputs)
    pyramiddrop.remove()
    compile_model(model, "pyramiddrop_snapkv", {"snapkv.window": parse_value("16")})  # capacity 512: no eviction
    result = generate(model, inputs)
    assert result.sequences.shape[1] == inputs["input_ids"].shape[1] + STEPS
    assert torch.equal(result.sequences, alone.sequences)
    assert all(torch.equal(a, b) for a, b in zip(result.scores, alone.scores, strict=True))


@pytest.mark.parametrize(("seed", "batch"), [(3, 2), (5, 1)])
def test_pyramiddrop_with_an_evicting_snapkv_equals_the_composed_reference(seed: int, batch: int) -> None:
    """PyramidDrop's prefill (tests/reference/staged_drop.py's next-layer scores and compact positions) under
    SnapKV's cache, in the reference decoder with per-head caches."""
    model = tiny_llava_clip(seed=seed, num_llm_layers=25)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    stages = [Stage(5, 9), Stage(11, 5), Stage(17, 3)]  # int(16 * 0.6 ** (i + 1)) after depth / 4 - 1, ... of 25
    expected = cache_generate(eager_copy(model), **inputs, policy_for_row=lambda: SnapKV(3, 8, 7, "max"),
                              max_new_tokens=STEPS, stages=stages, compact=True, next_layer=True)
    compiled(model, "use pyramiddrop(lam=0.6)\nuse snapkv(window=3, capacity=8)")
    result = generate(model, inputs)
    assert max(cache_lengths(result)) < inputs["input_ids"].shape[1]  # every layer evicted
    assert_matches(result, expected, inputs)


@pytest.mark.parametrize("cache", ["snapkv(window=2, capacity=8, kernel=3)", "heavy_hitter(heavy=3, recent=2)",
                                   "sink_window(sinks=2, window=5)"])
def test_cache_policies_after_compact_prefill_drops_equal_single_runs(cache: str) -> None:
    model = tiny_llava_clip(seed=2)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=2)
    compiled(model, f"""stage llm.layer[0] {{ keep top 12 of vision by attention(last -> vision)
                                              positions compact }}
                        stage llm.layer[2] {{ keep top 5 of vision by attention(last -> vision)
                                              positions compact }}
                        stage decode {{ cache {cache} }}""")
    batched = generate(model, inputs)
    assert max(cache_lengths(batched)) < inputs["input_ids"].shape[1]  # every layer evicted
    assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, batched, STEPS)
