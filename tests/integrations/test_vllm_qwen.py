"""Qwen2-VL and Qwen2.5-VL through vLLM's offline engine with policyc's plugin, against policyc on transformers: for
images of different sizes (one or two per prompt), each image's prompt holds the policy's count of image tokens for
its grid, its kept token indices equal policyc's on transformers, and the greedy answers and their log-probabilities
are equal (which needs the kept tokens at their unpruned M-RoPE coordinates and the text after each image where the
unpruned layout puts it); a request's own budget is refused. Without a policy, the model is served as transformers
runs it. One small engine per deployment, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Skipped without
vLLM, as test_vllm.py.

The tiny models are saved with save_pretrained next to a real Qwen2-VL processor (test_processors.py's: a random
tokenizer with Qwen's vision markers, 4x4-pixel patches, a 2x2 merge); their LLM heads are 32 wide, the narrowest
vLLM's CPU attention runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("POLICYC_REQUIRE_INTEGRATIONS") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'policyc[vllm]')")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes most of the machine's memory
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model(kept_slots)

import numpy as np
import torch
import transformers
from PIL import Image
from test_processors import QWEN_IDS, VOCAB, qwen
from tiny_models import PAD_ID
from vllm import LLM, SamplingParams

from policyc.integrations.vllm.deployment import deployment
from policyc.integrations.vllm.qwen2_vl import kept_slots
from policyc.integrations.vllm.qwen_stages import qwen_kept_count
from policyc.integrations.vllm.stages import RequestError
from policyc.lang.build import parse_value
from policyc.runtime import compile_model

SIZES = [[(32, 64)], [(32, 32)], [(64, 32)], [(32, 32), (48, 32)]]  # (height, width) of each prompt's images
NEW_TOKENS = 8
LOGPROB_ATOL = 1e-5  # float32 kernels' noise is ~4e-7; 1-D positions in place of M-RoPE's move them by ~1e-3


def served_qwen(version: str, directory: Path) -> tuple[Any, Any]:
    """A tiny Qwen2-VL (`"2"`) or Qwen2.5-VL (`"2.5"`) and its processor, saved in `directory`: 2 encoder blocks of
    width 32 on 4x4-pixel patches, a 2x2 merger, a 2-layer LLM of width 128 (4 query, 2 key/value heads of 32) with
    M-RoPE sections [4, 6, 6] (theta 100: positions weigh more than at 10000)."""
    _, processor = qwen(version)
    text = {"hidden_size": 128, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": VOCAB, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100.0, "mrope_section": [4, 6, 6]},
            "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 128, "num_heads": 4, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    if version == "2":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision["mlp_ratio"] = 2
    else:
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 128, "window_size": 16,
                   "fullatt_block_indexes": [1]}
    image, video, start, end = QWEN_IDS
    config = config_class(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                          vision_start_token_id=start, vision_end_token_id=end, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


@pytest.fixture
def in_process() -> Iterator[None]:
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if previous is None:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def _requests(processor: Any) -> list[tuple[str, list[Image.Image]]]:
    """The prompts of `SIZES`, each with its random images and a question after them."""
    generator = np.random.default_rng(0)
    requests = []
    for sizes in SIZES:
        images = [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what is in the picture ?"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        requests.append((prompt, images))
    return requests


def _through_vllm(directory: Path, requests: list[tuple[str, list[Image.Image]]], entry: dict[str, Any] | None
                  ) -> tuple[list[list[int]], list[list[int]], list[list[float]], list[list[list[int]]]]:
    """Per request through vLLM: its prompt ids, its answer's ids and their log-probabilities, and (with a policy)
    each image's kept slots."""
    overrides = {} if entry is None else {"hf_overrides": {"policyc": entry}}
    engine = LLM(model=str(directory), dtype="float32", max_model_len=512, enforce_eager=True,
                 limit_mm_per_prompt={"image": 2, "video": 0}, seed=0, **overrides)
    prompts, answers, logprobs, slots = [], [], [], []
    try:
        for prompt, images in requests:  # one at a time: kept_slots reads the last encoding
            [out] = engine.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}],
                                    SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0),
                                    use_tqdm=False)
            prompts.append(list(out.prompt_token_ids))
            answers.append(list(out.outputs[0].token_ids))
            logprobs.append([step[token].logprob for step, token in zip(out.outputs[0].logprobs, answers[-1],
                                                                         strict=True)])
            if entry is not None:
                [kept] = engine.apply_model(kept_slots)
                slots.append(kept)
        if entry is not None:  # a request's own budget is refused alone on Qwen
            prompt, images = requests[0]
            with pytest.raises(RequestError, match="policyc serves no per-request budgets on Qwen2-VL"):
                engine.generate([{"prompt": prompt, "multi_modal_data": {"image": images},
                                  "mm_processor_kwargs": {"policyc": {"ratio": "10%"}}}],
                                SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        engine.llm_engine.engine_core.shutdown()
    return prompts, answers, logprobs, slots


def _through_transformers(model: Any, processor: Any, requests: list[tuple[str, list[Image.Image]]],
                          compiled: Any = None) -> tuple[list[list[int]], list[list[float]], list[list[list[int]]]]:
    """Per request on transformers: its answer's ids and their log-probabilities, and (with `compiled`) each image's
    kept slots."""
    answers, logprobs, slots = [], [], []
    for prompt, images in requests:
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        with torch.no_grad():
            if compiled is not None:
                features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                          image_grid_thw=inputs["image_grid_thw"]).pooler_output
                masks = compiled.images.kept.split([len(f) for f in features])
                slots.append([m.nonzero()[:, 0].tolist() for m in masks])
            generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True)
        answers.append(generated.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        logprobs.append([float(torch.log_softmax(scores[0].double(), -1)[token])
                         for scores, token in zip(generated.scores, answers[-1], strict=True)])
    return answers, logprobs, slots


def test_without_a_policy_qwen2_vl_is_served_as_transformers_runs_it(in_process: None, tmp_path: Path) -> None:
    model, processor = served_qwen("2", tmp_path)
    requests = _requests(processor)
    prompts, answers, logprobs, _ = _through_vllm(tmp_path, requests, None)
    image_id = QWEN_IDS[0]
    expected_counts = [sum(h * w // 64 for h, w in sizes) for sizes in SIZES]  # one token per 8x8 pixels
    assert [p.count(image_id) for p in prompts] == expected_counts
    expected_answers, expected_logprobs, _ = _through_transformers(model, processor, requests)
    assert answers == expected_answers
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=LOGPROB_ATOL)


CASES = [("2", "divprune", {"ratio": "25%"}), ("2", "random_drop", {}), ("2.5", "divprune", {"ratio": "50%"}),
         ("2", "tome", {"r": 2})]  # ToMe merges in the tower and unmerges before the merger: every token stays


@pytest.mark.parametrize(("version", "policy", "params"), CASES, ids=[f"qwen{v}-{p}" for v, p, _ in CASES])
def test_policy_through_vllm_equals_transformers(in_process: None, tmp_path: Path, version: str, policy: str,
                                                  params: dict[str, Any]) -> None:
    model, processor = served_qwen(version, tmp_path)
    requests = _requests(processor)
    entry = {"policy": policy, "params": params}
    prompts, answers, logprobs, slots = _through_vllm(tmp_path, requests, entry)
    compiled = compile_model(model, policy, {name: parse_value(str(value)) for name, value in params.items()})
    try:
        expected_answers, expected_logprobs, expected_slots = _through_transformers(model, processor, requests,
                                                                                    compiled)
    finally:
        compiled.remove()
    assert slots == expected_slots
    config = model.config
    config.policyc = entry
    found = deployment(config)
    assert found is not None
    counts = [sum(qwen_kept_count(config, found, (h // 4, w // 4)) for h, w in sizes) for sizes in SIZES]
    assert [p.count(QWEN_IDS[0]) for p in prompts] == counts == [sum(map(len, s)) for s in expected_slots]
    dropped = [len(s) < h * w // 64 for kept, sizes in zip(slots, SIZES, strict=True)
               for s, (h, w) in zip(kept, sizes, strict=True)]
    assert set(dropped) == {policy != "tome"}  # the drops dropped tokens of every image
    assert answers == expected_answers
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=LOGPROB_ATOL)


def test_serve_arguments_on_qwen2_vl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`policyc serve DIR divprune` on a Qwen2-VL: the policy checked and its count for a 64x64 image printed."""
    from policyc.integrations.vllm.serve import serve_arguments

    served_qwen("2", tmp_path)
    arguments = serve_arguments(str(tmp_path), "divprune", {"ratio": "25%"}, ["--port", "8000"])
    assert str(tmp_path) in arguments
    assert "16 image tokens for a 64x64-pixel image" in capsys.readouterr().err
