"""policyc's pre-LLM stages in vLLM with tensor_parallel_size=2 on the CPU (two worker processes, gloo): the greedy
answers to 30 synthetic questions equal policyc's on transformers (test_vllm.py proves the same at size 1), with
each rank running the transformers tower and projector whole. vLLM binds each CPU rank to a NUMA node by default
and fails on a machine with one; these run unbound (VLLM_CPU_OMP_THREADS_BIND=nobind). Skipped without vLLM, as
test_vllm.py."""

from __future__ import annotations

import os
from typing import Any

import pytest

if os.environ.get("POLICYC_REQUIRE_INTEGRATIONS") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'policyc[vllm]')")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes most of the machine's memory

from vllm import LLM, SamplingParams

from policyc.evaluation import answer_batch, prompt_text, synthetic_items
from policyc.lang.build import parse_value
from policyc.models.bundled import DEFAULT_NAME, bundled_model_dir, load_reference_model, load_reference_processor
from policyc.runtime import compile_model

ITEMS = 30
POLICY = {"policy": "visionzip", "params": {"dominant": 40, "contextual": 8}}


@pytest.fixture(scope="module")
def engine() -> Any:
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # read by the workers vLLM spawns now
    try:
        llm = LLM(model=str(bundled_model_dir()), hf_overrides={"policyc": POLICY}, tensor_parallel_size=2,
                  dtype="float32", max_model_len=512, enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0)
    finally:
        if previous is None:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_tensor_parallel_answers_equal_transformers(engine: Any) -> None:
    model, processor = load_reference_model(DEFAULT_NAME), load_reference_processor(DEFAULT_NAME)
    items = synthetic_items("test", ITEMS)
    prompts = [prompt_text(processor, item.question) for item in items]
    requests = [{"prompt": p, "multi_modal_data": {"image": i.image}} for p, i in zip(prompts, items, strict=True)]
    outputs = engine.generate(requests, SamplingParams(max_tokens=8, temperature=0))
    served = [processor.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outputs]
    params = {name: parse_value(str(value)) for name, value in POLICY["params"].items()}
    compiled = compile_model(model, POLICY["policy"], params)
    try:
        expected = [a.text for start in range(0, ITEMS, 15) for a in answer_batch(
            model, processor, [[i.image] for i in items[start:start + 15]], prompts[start:start + 15], compiled,
            max_new_tokens=8, do_sample=False)]
    finally:
        compiled.remove()
    assert served == expected
