"""generate() modes on compiled tiny LLaVA models: sampling, several images in one prompt and the compiled decode step
of static caches, each checked against the unmodified model, a plain reference or the uncompiled run."""

from __future__ import annotations

import pytest
import torch
from generation import assert_one_compiled_decode_graph
from reference.fastv import fastv_generate
from reference.random_drop import random_drop_generate
from test_drop_before_llm import PASS_THROUGH, KeptSlots, greedy, slots_from_rows
from test_runtime import IDENTITY, TWO_STAGES, policy
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.runtime import compile_model

FASTV = "policy f { stage llm.layer[1] { keep top 25% of vision by attention(last -> vision) } }"


def sample(model: torch.nn.Module, inputs: dict, seed: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, top_p=1.0,
                          output_logits=True, return_dict_in_generate=True)


def test_sampling_with_the_identity_policy_draws_the_same_tokens_from_the_same_logits() -> None:
    model = tiny_llava_siglip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=4)
    reference = sample(model, inputs, seed=11)
    compile_model(model, policy(IDENTITY))
    result = sample(model, inputs, seed=11)
    assert torch.equal(result.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(result.logits, reference.logits, strict=True))


def test_sampling_with_a_drop_is_seeded_and_differs_from_the_full_model() -> None:
    model = tiny_llava_clip(seed=5)
    inputs = make_inputs(model, batch=2, pad_left=1, seed=6)
    full = sample(model, inputs, seed=2)
    compile_model(model, policy(TWO_STAGES))
    first, again = sample(model, inputs, seed=2), sample(model, inputs, seed=2)
    assert torch.equal(first.sequences, again.sequences)
    assert not torch.equal(first.logits[0], full.logits[0])  # the drop changes what the model sees


def test_fastv_over_two_images_in_one_prompt_matches_the_reference() -> None:
    model = tiny_llava_clip(seed=7)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=8, images=2)
    assert int((inputs["input_ids"][0] == 100).sum()) == 32
    expected, kept = fastv_generate(model, **inputs, layer=1, keep=0.25, max_new_tokens=6)
    compiled = compile_model(model, policy(FASTV))
    assert torch.equal(greedy(model, inputs, 6).sequences[:, -6:], expected)
    for row in range(2):
        image = (inputs["input_ids"][row] == 100).nonzero().flatten()
        assert torch.equal(compiled.kept_positions[row][torch.isin(compiled.kept_positions[row], image)], kept[row])


def test_drop_before_the_llm_over_two_images_in_one_prompt_matches_the_reference() -> None:
    model = tiny_llava_clip(seed=9)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=10, images=2)
    expected, kept_rows = random_drop_generate(model, **inputs, fraction=0.5, seed=4, max_new_tokens=6)
    compiled = compile_model(model, policy(PASS_THROUGH))
    compiled.runtime.images = images = KeptSlots()
    images.kept = slots_from_rows(inputs["input_ids"], kept_rows, 16)
    assert images.kept.shape == (4, 16)
    assert torch.equal(greedy(model, inputs, 6).sequences[:, -6:], expected)


def test_image_text_to_text_pipeline_runs_the_compiled_model() -> None:
    from PIL import Image
    from transformers import pipeline

    import policyc
    from policyc.models.bundled import example_image_path
    from policyc.models.random_tiny import random_model, random_processor

    model, processor = random_model(banner=False), random_processor()
    image = Image.open(example_image_path()).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    policyc.compile(model, "fastv", ratio="25%")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    answer = pipe(text=messages, max_new_tokens=6, generate_kwargs={"do_sample": False})[0]["generated_text"][-1]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    kept_by_pipeline = model.policyc.kept_positions.clone()
    direct = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert answer["content"] == processor.decode(direct[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert kept_by_pipeline.shape[1] == inputs["input_ids"].shape[1] - image_tokens + image_tokens // 4


DROP_BEFORE_LLM = "policy r { stage projector.output { keep top 50% of vision by random(seed=1) } }"


@pytest.mark.parametrize("text", [FASTV, TWO_STAGES, IDENTITY, DROP_BEFORE_LLM])
def test_a_static_cache_decodes_in_one_compiled_graph(text: str) -> None:
    """On CUDA, generate() with a static cache compiles its decode step (transformers' auto-compile, mode
    reduce-overhead: CUDA graphs); `_compile_all_devices` makes it do so on CPU, here with dynamo's eager backend
    (the graphs inductor would compile, without code generation). A compiled policy's decode step is one graph, no
    break (policyc's per-call bookkeeping runs outside it), compiled for the first request and reused by the next of
    the same shape, and it decodes what the uncompiled static cache decodes."""
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
    compile_model(model, policy(text))
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert_one_compiled_decode_graph(model, inputs, expected, max_new_tokens=6)
