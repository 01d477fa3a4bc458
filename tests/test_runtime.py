"""The eager runtime on tiny LLaVA models: identity is bit-exact, drops shrink the cache, batches
with padding equal single runs, and what is not implemented fails at compile time."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.runtime import compile_model

IDENTITY = "policy identity { stage llm.layer[1] { keep top 100% of vision by attention(last -> vision) } }"
FASTV = "policy f { stage llm.layer[1] { keep top 50% of vision by attention(last -> vision) } }"
TWO_STAGES = """policy two {
  stage llm.layer[0] { keep top 75% of vision by attention(all -> vision, heads=max) }
  stage llm.layer[2] { drop top 2 of vision by -attention(text -> vision, queries=sum) }
}"""


def policy(text: str):  # type: ignore[no-untyped-def]
    return check_source(text, "p.tokpol")[0]


def run(model: torch.nn.Module, inputs: dict, steps: int = 5):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_policy_is_bit_exact_at_every_step(build, batch: int) -> None:  # type: ignore[no-untyped-def]
    model = build()
    inputs = make_inputs(model, batch=batch, pad_left=2 if batch > 1 else 0)
    reference = run(model, inputs)
    compiled = compile_model(model, policy(IDENTITY))
    result = run(model, inputs)
    assert torch.equal(result.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(result.scores, reference.scores, strict=True))
    assert compiled.kept_positions is not None and compiled.kept_positions.shape[1] == inputs["input_ids"].shape[1]
    compiled.remove()
    again = run(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(again.scores, reference.scores, strict=True))


def test_drop_keeps_text_and_the_top_image_tokens_and_shrinks_later_caches() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    image = (inputs["input_ids"][0] == 100).nonzero().squeeze(1)
    compiled = compile_model(model, policy(FASTV))
    result = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    kept = compiled.kept_positions[0]
    kept_image = kept[torch.isin(kept, image)]
    assert kept_image.numel() == image.numel() // 2
    assert torch.equal(kept[~torch.isin(kept, image)], (inputs["input_ids"][0] != 100).nonzero().squeeze(1))
    assert torch.equal(kept, kept.sort().values)
    lengths = [layer.keys.shape[-2] for layer in result.past_key_values.layers]
    prompt, generated = inputs["input_ids"].shape[1], 3  # the last token is not cached
    assert lengths == [prompt + generated] * 2 + [prompt - image.numel() // 2 + generated] * 2


def test_batch_with_left_padding_equals_single_runs() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=3, seed=1)
    compile_model(model, policy(TWO_STAGES))
    batched = run(model, inputs)
    for row in range(2):
        valid = inputs["attention_mask"][row].bool()
        single = {"input_ids": inputs["input_ids"][row : row + 1, valid],
                  "attention_mask": inputs["attention_mask"][row : row + 1, valid],
                  "pixel_values": inputs["pixel_values"][row : row + 1]}
        alone = run(model, single)
        assert torch.equal(batched.sequences[row, -5:], alone.sequences[0, -5:])
        for step_batched, step_alone in zip(batched.scores, alone.scores, strict=True):
            torch.testing.assert_close(step_batched[row], step_alone[0], rtol=0, atol=1e-5)


def test_unimplemented_features_fail_at_compile_time_at_their_line() -> None:
    model = tiny_llava_clip()
    text = "policy p {\n  stage llm.layer[1] { keep top 50% of vision by attention(last -> vision)\n" \
           "    positions cache_length }\n  stage decode { cache heavy_hitter(heavy=4, recent=2) }\n}"
    with pytest.raises(PolicyError) as caught:
        compile_model(model, policy(text))
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.span is not None and diagnostic.span.line == 4
    assert "cache heavy_hitter with positions cache_length is not implemented by policyc's runtime yet" \
        in diagnostic.message


def test_static_cache_matches_the_dynamic_cache() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=2)
    identity = compile_model(model, policy(IDENTITY))
    reference = run(model, inputs)
    static = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, cache_implementation="static")
    assert torch.equal(static.sequences, reference.sequences)
    identity.remove()
    compile_model(model, policy(TWO_STAGES))
    assert_static_matches_dynamic(model, inputs)


def assert_static_matches_dynamic(model: torch.nn.Module, inputs: dict, steps: int = 6) -> None:
    dynamic = run(model, inputs, steps=steps)
    static = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_ragged_batches_equal_single_runs() -> None:
    """Samples keeping different counts at a stage: the one keeping fewer carries fillers, masked everywhere."""
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    text = "policy p {\n  stage llm.layer[1] {\n    drop vision where key_norm < mean(key_norm)\n  }\n}"
    compiled = compile_model(model, policy(text))
    batched = run(model, inputs)
    assert compiled.runtime.live_at_layer[2] is not None  # the samples kept different counts
    for row in range(2):
        valid = inputs["attention_mask"][row].bool()
        alone = run(model, {"input_ids": inputs["input_ids"][row : row + 1, valid],
                            "attention_mask": inputs["attention_mask"][row : row + 1, valid],
                            "pixel_values": inputs["pixel_values"][row : row + 1]})
        assert torch.equal(batched.sequences[row, -5:], alone.sequences[0, -5:])
        for step_batched, step_alone in zip(batched.scores, alone.scores, strict=True):
            torch.testing.assert_close(step_batched[row], step_alone[0], rtol=0, atol=1e-5)


def test_compact_positions_with_a_static_cache_match_the_dynamic_cache() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2, pad_left=2)
    compile_model(model, policy(TWO_STAGES.replace("heads=max) }", "heads=max)\n positions compact }")
                                .replace("queries=sum) }", "queries=sum)\n positions compact }")))
    assert_static_matches_dynamic(model, inputs)


@pytest.mark.parametrize("text", [IDENTITY, TWO_STAGES.replace("top 75%", "top 100%").replace("top 2", "top 0")],
                         ids=["one_stage", "two_stages"])
def test_identity_policy_is_bit_exact_with_eager_attention(text: str) -> None:
    model = tiny_llava_clip(seed=6)
    model.set_attn_implementation("eager")
    inputs = make_inputs(model, batch=2, pad_left=2, seed=6)
    reference = run(model, inputs)
    compiled = compile_model(model, policy(text))
    assert model.config.text_config._attn_implementation == "policyc_eager"  # still eager, now recording
    result = run(model, inputs)
    assert torch.equal(result.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(result.scores, reference.scores, strict=True))
    compiled.remove()
    assert model.config.text_config._attn_implementation == "eager"


def test_padding_is_read_from_every_mask_form_generate_hands_the_model() -> None:
    """The 2D padding mask, a static cache's 4D mask (bool or additive), and its mapping per layer type (Qwen2-VL
    with a static cache): the full-attention entry, None there meaning no padding; without one, a clear error."""
    from policyc.runtime.rows import valid_keys

    input_ids = torch.zeros(2, 4, dtype=torch.long)
    padding = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    four_d = (causal[None] & padding.bool()[:, None, :])[:, None]  # [2, 1, 4, 4]
    additive = torch.zeros(four_d.shape).masked_fill(~four_d, torch.finfo(torch.float32).min)
    for mask in (padding, four_d, additive, {"full_attention": four_d, "sliding_attention": None}):
        assert torch.equal(valid_keys(mask, input_ids), padding.bool())
    assert bool(valid_keys({"full_attention": None}, input_ids).all())
    with pytest.raises(PolicyError, match=r"masks of layer types \['sliding_attention'\] only") as error:
        valid_keys({"sliding_attention": four_d}, input_ids)
    assert "pass a 2D attention_mask" in str(error.value)
