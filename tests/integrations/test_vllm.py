"""policyc's pre-LLM stages inside vLLM (policyc.integrations.vllm), through vLLM's own offline engine on the
bundled model: the `vllm.general_plugins` entry point, prompts holding the policy's count of image tokens, each
image's kept slots equal to policyc on transformers, greedy answers to 100 synthetic questions equal to policyc on
transformers (so accuracy is identical), requests that narrow the budget (`mm_processor_kwargs`) served as policyc
serves those parameters on transformers, an invalid request budget failing that request alone, and an unservable
policy, a model family without a vLLM path or a malformed `policyc` entry refused before the engine starts. One
engine (VisionZip) serves the module. Every other servable policy through vLLM: test_vllm_policies.py; their stages
against transformers, without vLLM: tests/test_vllm_stages.py.

These tests need vLLM, whose CPU build needs a torchvision built for its torch: CI runs them in their own venv
(scripts/integrations-venv.sh). Elsewhere they are skipped, unless POLICYC_REQUIRE_INTEGRATIONS=1 makes a missing
vLLM a failure (as CI sets it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points
from typing import Any

import pytest

if os.environ.get("POLICYC_REQUIRE_INTEGRATIONS") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'policyc[vllm]')")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes most of the machine's memory
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model(kept_slots)

import torch
from vllm import LLM, SamplingParams

from policyc.errors import PolicyError
from policyc.evaluation import answer_batch, prompt_text, synthetic_items
from policyc.integrations.vllm.llava import kept_slots
from policyc.integrations.vllm.stages import RequestError
from policyc.models.bundled import DEFAULT_NAME, bundled_model_dir, load_reference_model, load_reference_processor
from policyc.runtime import compile_model

ITEMS = 100  # synthetic test questions answered by both
POLICY = {"policy": "visionzip", "params": {"dominant": 40, "contextual": 8}}
KEPT = 48  # 40 + 8 of the bundled model's 144 image tokens
NARROW = {"dominant": 20, "contextual": 4}  # a request's budget: 24 image tokens
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "limit_mm_per_prompt": {"image": 1},
          "seed": 0}


@pytest.fixture(scope="module")
def engine() -> Any:
    llm = LLM(model=str(bundled_model_dir()), hf_overrides={"policyc": POLICY}, **ENGINE)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    return load_reference_model(DEFAULT_NAME), load_reference_processor(DEFAULT_NAME)


def _requests(processor: Any, items: list[Any]) -> list[dict[str, Any]]:
    return [{"prompt": prompt_text(processor, item.question), "multi_modal_data": {"image": item.image}}
            for item in items]


def test_entry_point_registers_policyc() -> None:
    found = [e for e in entry_points(group="vllm.general_plugins") if e.name == "policyc"]
    assert [e.value for e in found] == ["policyc.integrations.vllm:register"]


def test_prompts_hold_the_kept_count(engine: Any, reference: tuple[Any, Any]) -> None:
    _, processor = reference
    item = synthetic_items("test", 1)[0]
    [out] = engine.generate(_requests(processor, [item]), SamplingParams(max_tokens=1, temperature=0))
    unpruned = processor(images=[[item.image]], text=[prompt_text(processor, item.question)], return_tensors="pt")
    assert len(out.prompt_token_ids) == unpruned["input_ids"].shape[1] - 144 + KEPT
    assert out.prompt_token_ids.count(processor.tokenizer.convert_tokens_to_ids(processor.image_token)) == KEPT


def test_kept_slots_equal_transformers(engine: Any, reference: tuple[Any, Any]) -> None:
    model, processor = reference
    items = synthetic_items("test", 4)
    for item in items:
        engine.generate(_requests(processor, [item]), SamplingParams(max_tokens=1, temperature=0))
        [served] = engine.apply_model(kept_slots)
        inputs = processor(images=[[item.image]], text=[prompt_text(processor, item.question)], return_tensors="pt")
        compiled = compile_model(model, POLICY["policy"], _params())
        try:
            with torch.no_grad():
                model.get_image_features(pixel_values=inputs["pixel_values"])
            expected = compiled.images.kept[0].nonzero()[:, 0].tolist()
        finally:
            compiled.remove()
        assert served == [expected]
        assert len(expected) == KEPT


def _params(values: dict[str, Any] | None = None) -> dict[str, Any]:
    from policyc.lang.build import parse_value

    return {name: parse_value(str(value)) for name, value in (values or POLICY["params"]).items()}


def _expected(model: Any, processor: Any, items: list[Any], values: dict[str, Any]) -> tuple[list[str], list[list]]:
    """policyc on transformers with VisionZip `values`: the greedy answers (8 tokens) and each image's kept slots."""
    compiled = compile_model(model, POLICY["policy"], _params(values))
    try:
        slots = []
        for item in items:
            inputs = processor(images=[[item.image]], text=[prompt_text(processor, item.question)], return_tensors="pt")
            with torch.no_grad():
                model.get_image_features(pixel_values=inputs["pixel_values"])
            slots.append(compiled.images.kept[0].nonzero()[:, 0].tolist())
        answers = [a.text for a in answer_batch(model, processor, [[i.image] for i in items],
                                                [prompt_text(processor, i.question) for i in items], compiled,
                                                max_new_tokens=8, do_sample=False)]
    finally:
        compiled.remove()
    return answers, slots


def test_requests_narrow_the_budget(engine: Any, reference: tuple[Any, Any]) -> None:
    """Two requests at NARROW and two at the deployment's budget, in one batch; then one narrowed image's slots."""
    model, processor = reference
    items = synthetic_items("test", 4)
    requests = _requests(processor, items)
    for request in requests[:2]:
        request["mm_processor_kwargs"] = {"policyc": NARROW}
    outputs = engine.generate(requests, SamplingParams(max_tokens=8, temperature=0))
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert [out.prompt_token_ids.count(image_token) for out in outputs] == [24, 24, KEPT, KEPT]
    served = [processor.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True) for out in outputs]
    narrow, narrow_slots = _expected(model, processor, items[:2], NARROW)
    wide, _ = _expected(model, processor, items[2:], POLICY["params"])
    assert served == narrow + wide
    engine.generate([requests[1]], SamplingParams(max_tokens=1, temperature=0))
    assert engine.apply_model(kept_slots) == [[narrow_slots[1]]]
    assert len(narrow_slots[1]) == 24


@pytest.mark.parametrize(("budget", "message", "hint"), [
    ({"dominant": 100}, "policyc (dominant=100) keeps 108 tokens of each image, more than the 48 the deployment keeps",
     "ask for at most 48"),
    ({"dominantt": 20}, "no searchable parameter 'dominantt'", "did you mean 'dominant'?"),
    ({"dominant": 4}, "dominant", "8"),
    ({"dominant": [20]}, "mm_processor_kwargs policyc.dominant is [20]", "a percentage"),
    ("24", "mm_processor_kwargs policyc is '24', not the policy's parameters", '{"policyc": {"tokens": 20}}'),
])
def test_an_invalid_request_budget_fails_alone(engine: Any, reference: tuple[Any, Any], budget: object, message: str,
                                               hint: str) -> None:
    _, processor = reference
    [request] = _requests(processor, synthetic_items("test", 1))
    with pytest.raises(RequestError) as caught:
        engine.generate([request | {"mm_processor_kwargs": {"policyc": budget}}], SamplingParams(max_tokens=1))
    assert message in str(caught.value)
    assert hint in str(caught.value).split("hint:")[-1]
    [out] = engine.generate([request], SamplingParams(max_tokens=1, temperature=0))  # the engine serves on
    assert out.prompt_token_ids.count(processor.tokenizer.convert_tokens_to_ids(processor.image_token)) == KEPT


def test_greedy_answers_equal_transformers(engine: Any, reference: tuple[Any, Any]) -> None:
    model, processor = reference
    items = synthetic_items("test", ITEMS)
    outputs = engine.generate(_requests(processor, items), SamplingParams(max_tokens=8, temperature=0))
    decode = processor.tokenizer.decode  # vLLM's own text keeps the first token's leading space
    served = [decode(out.outputs[0].token_ids, skip_special_tokens=True) for out in outputs]
    compiled = compile_model(model, POLICY["policy"], _params())
    try:
        expected = [answer.text for start in range(0, ITEMS, 16) for answer in answer_batch(
            model, processor, [[i.image] for i in items[start:start + 16]],
            [prompt_text(processor, i.question) for i in items[start:start + 16]], compiled, "visionzip",
            max_new_tokens=8, do_sample=False)]
    finally:
        compiled.remove()
    assert served == expected
    assert len({text.split()[0] for text in served if text.split()}) > 3  # the answers differ by question


def test_unservable_policy_is_refused_before_the_engine_starts() -> None:
    with pytest.raises(PolicyError) as caught:
        LLM(model=str(bundled_model_dir()), hf_overrides={"policyc": {"policy": "fastv"}}, **ENGINE)
    message = str(caught.value)
    assert "fastv.tokpol:14:9: error: stage llm.layer[layer] runs at llm.layer, inside the LLM" in message
    assert "hint: serve a pre-LLM policy instead: fastervlm" in message


def _qwen2_vl(directory: Any) -> str:
    """A tiny Qwen2-VL's config (vLLM refuses the entry once it has read the config, before any weights)."""
    from transformers import Qwen2VLConfig

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 160, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "patch_size": 4, "spatial_merge_size": 2}
    Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151, video_token_id=152,
                  vision_start_token_id=153, vision_end_token_id=154,
                  architectures=["Qwen2VLForConditionalGeneration"]).save_pretrained(directory)
    return str(directory)


def _qwen3_vl(directory: Any) -> str:
    """A tiny Qwen3-VL's config: a family the plugin does not serve."""
    from tiny_qwen3_vl import tiny_qwen3_vl

    config = tiny_qwen3_vl().config
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    config.save_pretrained(directory)
    return str(directory)


FAMILY_DIRECTORIES = {"qwen2_vl": _qwen2_vl, "qwen3_vl": _qwen3_vl}


@pytest.mark.parametrize(("family", "entry", "message", "hint"), [
    ("qwen3_vl", {"policy": "divprune"}, "policyc cannot serve this 'qwen3_vl' model (Qwen3VLForConditionalGeneration)"
     " in vLLM: its plugin serves LLaVA (a CLIP or SigLIP vision tower), Qwen2-VL, Qwen2.5-VL, and vLLM would serve "
     "this model without the policy", "serve a LLaVA or Qwen2-VL or Qwen2.5-VL model, or drop the 'policyc' entry"),
    ("qwen2_vl", {"policy": "visionzip"}, "the policy reads the encoder's CLS token, but this model's vision tower",
     "towers without CLS"),
    ("qwen2_vl", {"policy": "visionzip", "param": {}}, "hf_overrides policyc has an unknown field 'param'", "params"),
    ("llava", "visionzip", "hf_overrides policyc is 'visionzip', not a policy", '{"policyc": {"policy": "visionzip"'),
    ("llava", {"policy": "visionzip", "params": {"dominant": 1}}, "dominant", "8"),
    ("llava", {"policy": "mustdropp"}, "no file or standard-library policy named 'mustdropp'", "mustdrop"),
])
def test_bad_deployment_is_refused_before_the_engine_starts(tmp_path: Any, family: str, entry: object, message: str,
                                                            hint: str) -> None:
    model = FAMILY_DIRECTORIES[family](tmp_path) if family in FAMILY_DIRECTORIES else str(bundled_model_dir())
    with pytest.raises(PolicyError) as caught:
        LLM(model=model, hf_overrides={"policyc": entry}, **ENGINE)
    assert message in str(caught.value)
    assert hint in str(caught.value).split("hint:")[-1]


def test_serve_refuses_an_unservable_policy_before_vllm_starts() -> None:
    from click.testing import CliRunner

    from policyc.cli import main

    result = CliRunner().invoke(main, ["serve", "fastv", "--port", "8000"])
    assert result.exit_code != 0
    assert "stage llm.layer[layer] runs at llm.layer, inside the LLM" in result.output
    result = CliRunner().invoke(main, ["serve", "fastervlm", "--param", "tokens=0"])
    assert "0 is outside the range [1, 2304] of 'tokens'" in result.output


def test_serve_arguments() -> None:
    from policyc.integrations.vllm.serve import serve_arguments

    arguments = serve_arguments(None, "fastervlm", {"tokens": "20"}, ["--port", "8000"])
    overrides = arguments[arguments.index("--hf-overrides") + 1]
    assert json.loads(overrides) == {"policyc": {"policy": "fastervlm", "params": {"tokens": "20"}}}
    assert str(bundled_model_dir()) in arguments
    assert arguments[-2:] == ["--port", "8000"]


def test_policyc_serve_answers_a_chat_request(reference: tuple[Any, Any]) -> None:
    """The README's commands: `policyc serve` on the embedded model, OpenAI chat requests with an image: one whose
    budget (`mm_processor_kwargs`) would widen the deployment's, refused with 400, one that narrows it, and one at the
    deployment's budget, answered as transformers answers."""
    port = _free_port()
    command = [sys.executable, "-m", "policyc.cli", "serve", "visionzip", "--param", "dominant=40", "--param",
               "contextual=8", "--port", str(port), "--served-model-name", "default", "--trust-request-mm-kwargs",
               *_SERVER]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(server, port)
        item = synthetic_items("test", 1)[0]
        buffer = io.BytesIO()
        item.image.save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        body = {"model": "default", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": item.question}]}]}
        bad, refused = _chat(port, body | {"mm_processor_kwargs": {"policyc": {"dominant": 100}}})
        narrowed, narrowed_answer = _chat(port, body | {"mm_processor_kwargs": {"policyc": NARROW}})
        status, answer = _chat(port, body)  # the server serves on after a refused request
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    model, processor = reference
    # vLLM's chat renders the chat template and adds no special tokens: the bundled model's template has no BOS
    inputs = processor(images=[item.image], text=prompt_text(processor, item.question), add_special_tokens=False,
                       return_tensors="pt")
    assert (status, narrowed, bad) == (200, 200, 400)
    assert "keeps 108 tokens of each image, more than the 48 the deployment keeps" in json.dumps(refused)
    assert answer["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1] - 144 + KEPT
    assert narrowed_answer["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1] - 144 + 24
    compiled = compile_model(model, POLICY["policy"], _params())
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        compiled.remove()
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer["choices"][0]["message"]["content"].strip() == expected.strip() != ""


def _chat(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a chat completion request."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


_SERVER = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(server: subprocess.Popen, port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"policyc serve exited with {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"policyc serve did not answer on port {port} within {timeout} s")
