"""Every servable standard-library policy through vLLM's offline engine on the bundled model: each image's prompt
holds the policy's count of image tokens, its kept token indices equal policyc's on transformers for the same image,
and the greedy answers are equal. A vLLM engine serves one policy (the deployment's, fixed when it starts), so each
policy gets its own small engine, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no engine process to spawn).
VisionZip has the shared engine of test_vllm.py; the same policies' stages without vLLM: tests/test_vllm_stages.py.
Without a policy, the model is served unmodified.
Skipped without vLLM, as test_vllm.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

if os.environ.get("POLICYC_REQUIRE_INTEGRATIONS") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'policyc[vllm]')")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes most of the machine's memory

import torch
from vllm import LLM, SamplingParams

from policyc.evaluation import answer_batch, prompt_text, synthetic_items
from policyc.integrations.vllm.llava import kept_slots
from policyc.integrations.vllm.stages import SERVABLE, RequestError
from policyc.lang.build import parse_value
from policyc.models.bundled import DEFAULT_NAME, bundled_model_dir, load_reference_model, load_reference_processor
from policyc.runtime import compile_model

ITEMS = 3  # synthetic test questions per policy
POLICIES = [  # (policy, params, image tokens kept of the bundled model's 144)
    ("fastervlm", {"tokens": 20}, 20), ("vtc_cls", {}, 64), ("hiprune", {"tokens": 64}, 64), ("tome", {"r": 4}, 52),
    ("divprune", {"ratio": "25%"}, 36), ("todre_diversity", {}, 14), ("random_drop", {}, 36), ("grid", {}, 36),
    ("pool", {}, 36), ("evit", {}, 53), ("gtp_vit", {"r": 2}, 98), ("expedit", {"size": 8}, 64), ("fopru", {}, 36),
]


def test_every_servable_policy_is_covered() -> None:
    assert {policy for policy, _, _ in POLICIES} | {"visionzip"} == set(SERVABLE)


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    return load_reference_model(DEFAULT_NAME), load_reference_processor(DEFAULT_NAME)


@pytest.fixture
def in_process() -> Iterator[None]:
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if previous is None:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


@pytest.mark.parametrize(("policy", "params", "count"), POLICIES, ids=[p for p, _, _ in POLICIES])
def test_policy_through_vllm_equals_transformers(in_process: None, reference: tuple[Any, Any], policy: str,
                                                  params: dict[str, Any], count: int) -> None:
    model, processor = reference
    items = synthetic_items("test", ITEMS)
    prompts = [prompt_text(processor, item.question) for item in items]
    engine = LLM(model=str(bundled_model_dir()), hf_overrides={"policyc": {"policy": policy, "params": params}},
                 dtype="float32", max_model_len=512, enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0)
    try:
        served, slots = [], []
        for prompt, item in zip(prompts, items, strict=True):  # one at a time: kept_slots reads the last encoding
            [out] = engine.generate([{"prompt": prompt, "multi_modal_data": {"image": item.image}}],
                                    SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
            image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            assert out.prompt_token_ids.count(image_token) == count
            served.append(processor.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True))
            [[kept]] = engine.apply_model(kept_slots)
            slots.append(kept)
    finally:
        engine.llm_engine.engine_core.shutdown()
    compiled = compile_model(model, policy, {name: parse_value(str(value)) for name, value in params.items()})
    try:
        expected_slots = []
        for item in items:
            inputs = processor(images=[[item.image]], text=[prompt_text(processor, item.question)], return_tensors="pt")
            with torch.no_grad():
                model.get_image_features(pixel_values=inputs["pixel_values"])
            expected_slots.append(compiled.images.kept[0].nonzero()[:, 0].tolist())
        expected = [answer.text for answer in answer_batch(model, processor, [[i.image] for i in items], prompts,
                                                           compiled, policy, max_new_tokens=8, do_sample=False)]
    finally:
        compiled.remove()
    assert slots == expected_slots
    assert {len(s) for s in slots} == {count}
    assert served == expected


def test_without_a_policy_the_model_is_served_unmodified(in_process: None, reference: tuple[Any, Any]) -> None:
    """No `policyc` entry: every image token reaches the LLM, the answers are transformers' own, and a request's
    policyc parameters are refused (there is no policy to narrow)."""
    model, processor = reference
    items = synthetic_items("test", ITEMS)
    prompts = [prompt_text(processor, item.question) for item in items]
    requests = [{"prompt": p, "multi_modal_data": {"image": i.image}} for p, i in zip(prompts, items, strict=True)]
    engine = LLM(model=str(bundled_model_dir()), dtype="float32", max_model_len=512, enforce_eager=True,
                 limit_mm_per_prompt={"image": 1}, seed=0)
    try:
        outputs = engine.generate(requests, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        with pytest.raises(RequestError, match="this deployment serves no policyc policy"):
            engine.generate([requests[0] | {"mm_processor_kwargs": {"policyc": {"tokens": 20}}}],
                            SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        engine.llm_engine.engine_core.shutdown()
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert [out.prompt_token_ids.count(image_token) for out in outputs] == [144] * ITEMS
    served = [processor.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True) for out in outputs]
    expected = [answer.text for answer in answer_batch(model, processor, [[i.image] for i in items], prompts,
                                                       max_new_tokens=8, do_sample=False)]
    assert served == expected
