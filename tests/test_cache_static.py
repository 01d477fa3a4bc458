"""Decode-stage cache policies on static caches (policyc/runtime/cache_static.py): the same tokens and scores as the
plain references of test_cache_policies.py, one compiled decode graph for every request of a shape (transformers'
auto-compile, run on CPU with dynamo's eager backend), buffers reused in place, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from generation import assert_one_compiled_decode_graph
from reference.cache_loop import Stage
from reference.h2o import h2o_generate
from reference.regather import regather_generate
from reference.snapkv import snapkv_generate
from test_cache_policies import STEPS, assert_matches, compiled, generate
from tiny_models import make_inputs, tiny_llava_clip
from transformers import StaticCache

from policyc.bench import kv_bytes
from policyc.errors import PolicyError
from policyc.runtime import cache_static
from policyc.runtime.cache_static import StaticSlotLayer, static_capacity

H2O = "stage decode { cache heavy_hitter(heavy=4, recent=3) }"
SNAPKV = "stage decode { cache snapkv(window=3, capacity=10, kernel=3) }"
REGATHER = """stage llm.layer[1] { keep top 10 of vision by attention(last -> vision) }
              stage llm.layer[2] { keep top 5 of vision by attention(last -> vision) }
              stage decode { cache regather }"""
IMPORTANCE = """stage llm.layer[1] { keep top 8 of vision by attention(last -> vision) }
                stage decode { cache importance(mass=0.6, every=2) }"""
FASTV_H2O = """stage llm.layer[1] { keep top 25% of vision by attention(last -> vision) }
               stage decode { cache heavy_hitter(heavy=4, recent=3) }"""


def static(model: torch.nn.Module, inputs: dict, **kwargs: object):  # type: ignore[no-untyped-def]
    return generate(model, inputs, cache_implementation="static", **kwargs)


def held(layer: StaticSlotLayer) -> torch.Tensor:
    """[B, Hkv] tokens a static slot layer holds."""
    return (layer.positions >= 0).sum(-1)


@pytest.mark.parametrize("per_head", [True, False])
def test_heavy_hitter_on_a_static_cache_equals_h2o(per_head: bool) -> None:
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1)
    expected = h2o_generate(model, **inputs, heavy=4, recent=3, per_head=per_head, max_new_tokens=STEPS)
    flag = "true" if per_head else "false"
    compiled(model, f"stage decode {{ cache heavy_hitter(heavy=4, recent=3, per_head={flag}) }}")
    result = static(model, inputs)
    assert_matches(result, expected, inputs)
    layers = result.past_key_values.layers
    assert all(isinstance(layer, StaticSlotLayer) for layer in layers)
    assert all(bool((held(layer) == 7).all()) for layer in layers)  # heavy + recent after every step


def test_regather_after_prefill_stages_on_a_static_cache_equals_mustdrop() -> None:
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    expected = regather_generate(model, **inputs, stages=[Stage(1, 10), Stage(2, 5)], max_new_tokens=STEPS)
    compiled(model, REGATHER)
    assert_matches(static(model, inputs), expected, inputs)


@pytest.mark.parametrize("body", [IMPORTANCE, FASTV_H2O])
def test_static_equals_dynamic_after_prefill_stages(body: str) -> None:
    model = tiny_llava_clip(seed=4)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=4)
    compiled(model, body)
    dynamic, fixed = generate(model, inputs), static(model, inputs)
    assert torch.equal(fixed.sequences, dynamic.sequences)
    for a, b in zip(fixed.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    for kept, slots in zip(fixed.past_key_values.layers, dynamic.past_key_values.layers, strict=True):
        assert torch.equal(held(kept), (slots.positions >= 0).sum(-1))  # the same tokens evicted


def test_capacity_rounds_up_to_a_bucket_within_the_static_length() -> None:
    assert static_capacity(15, 4096) == 64 and static_capacity(64, 4096) == 64 and static_capacity(1088, 4096) == 1088
    assert static_capacity(70, 66) == 70 and static_capacity(50, 60) == 60  # never fewer than needed


def test_snapkv_on_a_static_cache_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """SnapKV evicts once: its slot layers hold its capacity and every token still to generate."""
    monkeypatch.setattr(cache_static, "CAPACITY_BUCKET", 4)
    model = tiny_llava_clip(seed=2)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=2)
    expected = snapkv_generate(model, **inputs, window=3, capacity=10, kernel=3, pool="max", max_new_tokens=STEPS)
    compiled(model, SNAPKV)
    result = static(model, inputs)
    assert_matches(result, expected, inputs)
    for layer in result.past_key_values.layers:  # the capacity, then every generated token but the last
        assert layer.keys.shape[2] == 20 and bool((held(layer) == 10 + STEPS - 1).all())  # 10 + 8, rounded up


def test_heavy_hitter_reuses_evicted_slots_for_as_many_tokens_as_generate_makes(monkeypatch: pytest.MonkeyPatch,
                                                                              ) -> None:
    """H2O holds at most heavy + recent candidates after each step (`most_held`): its slot layers have that many
    slots and one for the incoming token, however long generation runs; new tokens go into evicted slots, so slots
    are out of token order, and H2O still sees them in token order (`recent`, ties). Equal to the plain H2O."""
    monkeypatch.setattr(cache_static, "CAPACITY_BUCKET", 1)
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1)
    steps = 3 * STEPS
    expected = h2o_generate(model, **inputs, heavy=4, recent=3, per_head=True, max_new_tokens=steps)
    compiled(model, H2O)
    result = model.generate(**inputs, max_new_tokens=steps, do_sample=False, cache_implementation="static",
                            return_dict_in_generate=True)
    tokens = result.sequences[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(tokens, torch.stack([row.tokens for row in expected]))
    for layer in result.past_key_values.layers:
        assert layer.keys.shape[2] == 4 + 3 + 1 and bool((held(layer) == 7).all())
        assert not bool((layer.positions[..., 1:] > layer.positions[..., :-1]).all())  # reused out of order


def test_a_layer_out_of_empty_slots_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator holding more than it declared would overwrite a slot: eagerly that is an error. (Here H2O stops
    evicting after prefill but still declares its bound.)"""
    from policyc.passes.cache_heavy_hitter import HeavyHitter

    monkeypatch.setattr(cache_static, "CAPACITY_BUCKET", 1)
    evict = HeavyHitter.keep
    monkeypatch.setattr(HeavyHitter, "keep", lambda self, slots: evict(self, slots) if slots.after_prefill
                        else torch.ones_like(slots.real))
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1)
    compiled(model, H2O)
    with pytest.raises(RuntimeError, match="ran out of empty slots"):
        static(model, inputs)


def test_a_second_request_reuses_the_slot_buffers_in_place() -> None:
    model = tiny_llava_clip(seed=5)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=5)
    longer = make_inputs(model, batch=2, pad_left=1, text_before=6, seed=6)  # another prompt, another capacity
    expected = h2o_generate(model, **longer, heavy=4, recent=3, per_head=True, max_new_tokens=STEPS)
    compiled(model, H2O)
    first = static(model, inputs)
    layers = list(first.past_key_values.layers)
    pointers = [(layer.keys.data_ptr(), layer.positions.data_ptr()) for layer in layers]
    again = static(model, inputs)  # generate() resets and reuses its static cache
    assert torch.equal(again.sequences, first.sequences)
    assert all(a is b for a, b in zip(again.past_key_values.layers, layers, strict=True))
    assert [(layer.keys.data_ptr(), layer.positions.data_ptr()) for layer in layers] == pointers
    assert_matches(static(model, longer), expected, longer)


def test_decoding_holds_only_the_slots_and_a_reset_cache_prefills_again() -> None:
    """After prefill the full-size static layers release their storage (the KV figure counts the slots alone); a
    StaticCache the caller passes again after reset() gets them back, allocated anew by the next prefill."""
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1)
    expected = h2o_generate(model, **inputs, heavy=4, recent=3, per_head=True, max_new_tokens=STEPS)
    compiled(model, H2O)
    cache = StaticCache(config=model.config, max_cache_len=64)
    for _ in range(2):
        result = generate(model, inputs, past_key_values=cache)
        assert_matches(result, expected, inputs)
        layers = result.past_key_values.layers
        assert all(layer.original.keys is None and not layer.original.is_initialized for layer in layers)
        assert kv_bytes(result.past_key_values) == sum(
            t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
        assert [layer.keys.shape[2] for layer in layers] == [64] * 4  # H2O: 7 held + 1 incoming, rounded up
        cache.reset()


@pytest.mark.parametrize("body", [H2O, SNAPKV, IMPORTANCE, FASTV_H2O])
def test_a_static_cache_policy_decodes_in_one_compiled_graph(body: str) -> None:
    """transformers' compiled decode step (its CUDA-graph path, run on CPU): one graph, no break and no
    recompilation over steps and requests, the uncompiled tokens."""
    model = tiny_llava_clip(seed=6)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=6)
    compiled(model, body)
    assert_one_compiled_decode_graph(model, inputs, static(model, inputs).sequences, max_new_tokens=STEPS)


@pytest.mark.parametrize(("statement", "reason"), [
    ("cache sink_window(sinks=2, window=5)", "re-rotates the kept keys to their cache index after each eviction"),
    ("cache mixed_precision(mass=0.9, high_bits=4, low_bits=2, every=2)", "stores older keys and values in fewer"),
])
def test_operators_that_need_a_growing_cache_refuse_static_caches_at_their_statement(statement: str,
                                                                                    reason: str) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    compiled(model, f"stage llm.layer[1] {{ keep top 8 of vision by attention(last -> vision) }}\nstage decode {{\n"
                    f" {statement}\n}}")
    with pytest.raises(PolicyError) as caught:
        static(model, inputs)
    name = statement.split()[1].split("(")[0]
    assert str(caught.value).startswith(f"p.tokpol:4:2: error: cache {name} needs a dynamic KV cache: it {reason}")
    assert 'drop cache_implementation="static" from generate()' in str(caught.value)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(PolicyError):
        generate(model, inputs, past_key_values=cache)
