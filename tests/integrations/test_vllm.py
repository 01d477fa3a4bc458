"""policyc's pre-LLM stages inside vLLM (policyc.integrations.vllm), through vLLM's own offline engine on the
bundled model: the `vllm.general_plugins` entry point, prompts holding the policy's count of image tokens, each
image's kept slots equal to policyc on transformers, greedy answers to 100 synthetic questions equal to policyc on
transformers (so accuracy is identical), and an unservable policy refused before the engine starts. One engine
(VisionZip) serves the module. Every servable policy's stages against transformers, without vLLM:
tests/test_vllm_stages.py.

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
from policyc.models.bundled import DEFAULT_NAME, bundled_model_dir, load_reference_model, load_reference_processor
from policyc.runtime import compile_model

ITEMS = 100  # synthetic test questions answered by both
POLICY = {"policy": "visionzip", "params": {"dominant": 40, "contextual": 8}}
KEPT = 48  # 40 + 8 of the bundled model's 144 image tokens
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


def _params() -> dict[str, Any]:
    from policyc.lang.build import parse_value

    return {name: parse_value(str(value)) for name, value in POLICY["params"].items()}


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


def test_serve_refuses_an_unservable_policy_before_vllm_starts() -> None:
    from click.testing import CliRunner

    from policyc.cli import main

    result = CliRunner().invoke(main, ["serve", "fastv", "--port", "8000"])
    assert result.exit_code != 0
    assert "stage llm.layer[layer] runs at llm.layer, inside the LLM" in result.output
    result = CliRunner().invoke(main, ["serve", "fastervlm", "--param", "tokens=0"])
    assert "policy fastervlm keeps no token of each image" in result.output


def test_serve_arguments() -> None:
    from policyc.integrations.vllm.serve import serve_arguments

    arguments = serve_arguments(None, "fastervlm", {"tokens": "20"}, ["--port", "8000"])
    overrides = arguments[arguments.index("--hf-overrides") + 1]
    assert json.loads(overrides) == {"policyc": {"policy": "fastervlm", "params": {"tokens": "20"}}}
    assert str(bundled_model_dir()) in arguments
    assert arguments[-2:] == ["--port", "8000"]


def test_policyc_serve_answers_a_chat_request(reference: tuple[Any, Any]) -> None:
    """The README's commands: `policyc serve` on the embedded model, one OpenAI chat request with an image."""
    port = _free_port()
    command = [sys.executable, "-m", "policyc.cli", "serve", "visionzip", "--param", "dominant=40", "--param",
               "contextual=8", "--port", str(port), "--served-model-name", "default", *_SERVER]
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
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=120))
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    model, processor = reference
    # vLLM's chat renders the chat template and adds no special tokens: the bundled model's template has no BOS
    inputs = processor(images=[item.image], text=prompt_text(processor, item.question), add_special_tokens=False,
                       return_tensors="pt")
    assert answer["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1] - 144 + KEPT
    compiled = compile_model(model, POLICY["policy"], _params())
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        compiled.remove()
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer["choices"][0]["message"]["content"].strip() == expected.strip() != ""


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
