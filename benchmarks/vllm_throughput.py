"""vLLM's offline engine with and without a policy: throughput on N synthetic requests.

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/vllm_throughput.py --requests 200 --policy fastervlm --param tokens

    VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/vllm_throughput.py --requests 8 --mid-size /tmp/llava-mid

For the unmodified model, then POLICY at 11%, 22% and 33% of the image tokens (its parameter `--param`, a token
count), one engine each on the bundled model (policyc:default), or with `--mid-size DIR` on a mid-size LLaVA shape
with random weights (CLIP-L/336 and a 0.5B Llama, written to DIR once): the synthetic test questions with their images,
all submitted at once, greedy, `--max-tokens` new tokens each. Prints requests/s, prompt and output tokens/s (wall
time of `LLM.generate`), mean time to first token (vLLM's own histogram; every request is queued at once, so it
includes queueing) and KV blocks per request (ceil(tokens / block size), prompt and output). Figures, not
assertions: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

SHARES = (0.11, 0.22, 0.33)
COLUMNS = ("run", "image tokens", "requests/s", "prompt tok/s", "output tok/s", "mean TTFT ms", "block size",
           "KV blocks/request")


def _ttft(llm: Any) -> float:
    """Mean time to first token in ms from vLLM's histogram."""
    for metric in llm.get_metrics():
        if metric.name == "vllm:time_to_first_token_seconds":
            return 1000 * metric.sum / max(metric.count, 1)
    return math.nan


def _figure(value: object) -> str:
    """One decimal, or three significant digits below 10 (a mid-size model on a CPU serves < 1 request/s)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def build_mid_size(directory: Path) -> None:
    """A LLaVA of LLaVA-1.5's vision shape (CLIP ViT-L/14 at 336 px: 24 layers of width 1024, 576 image tokens) and
    a 0.5B Llama (32 layers of width 1024, MLP 4096, 16 heads, 4 KV heads), random weights (seeded), float32, with
    the bundled model's word-level tokenizer (so its vocabulary, 48, leaves the LLM's weights to its layers) and a
    processor that resizes to 336 px."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from policyc.models.bundled import DEFAULT_NAME, load_reference_processor

    processor = load_reference_processor(DEFAULT_NAME)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=32, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=64, vocab_size=len(processor.tokenizer),
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       initializer_range=0.02)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    print(f"mid-size LLaVA: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {directory}")
    model.save_pretrained(directory)
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    processor.save_pretrained(directory)


def run(label: str, model: str, overrides: dict[str, Any] | None, requests: list[dict[str, Any]], max_tokens: int,
        engine: dict[str, Any]) -> dict[str, Any]:
    """One engine, one generate() over every request; its figures."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, hf_overrides=overrides, disable_log_stats=False, **engine)
    llm.generate(requests[:2], SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)  # warm up
    start = time.perf_counter()
    outputs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    seconds = time.perf_counter() - start
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = [len(o.prompt_token_ids) for o in outputs]
    output = [len(o.outputs[0].token_ids) for o in outputs]
    image = llm.llm_engine.vllm_config.model_config.hf_config.image_token_index
    row = {"run": label, "image tokens": outputs[0].prompt_token_ids.count(image),
           "requests/s": len(outputs) / seconds, "prompt tok/s": sum(prompt) / seconds,
           "output tok/s": sum(output) / seconds, "mean TTFT ms": _ttft(llm),
           "block size": block,
           "KV blocks/request": sum(math.ceil((p + o) / block) for p, o in zip(prompt, output, strict=True))
           / len(outputs)}
    llm.llm_engine.engine_core.shutdown()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--policy", default="fastervlm")
    parser.add_argument("--param", default="tokens", help="POLICY's parameter that takes the kept token count")
    parser.add_argument("--mid-size", type=Path, metavar="DIR",
                        help="Benchmark a mid-size LLaVA with random weights, written to DIR unless it is there.")
    parser.add_argument("--json", help="Write the rows here.")
    args = parser.parse_args()

    from policyc.evaluation import prompt_text, synthetic_items
    from policyc.models.bundled import DEFAULT_NAME, bundled_model_dir, load_reference_processor

    model = str(bundled_model_dir())
    if args.mid_size is not None:
        if not (args.mid_size / "config.json").exists():
            build_mid_size(args.mid_size)
        model = str(args.mid_size)

    processor = load_reference_processor(DEFAULT_NAME)
    items = synthetic_items("test", args.requests)
    requests = [{"prompt": prompt_text(processor, i.question), "multi_modal_data": {"image": i.image}} for i in items]
    engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "limit_mm_per_prompt": {"image": 1},
              "seed": 0}
    rows = [run("unmodified", model, None, requests, args.max_tokens, engine)]
    tokens = rows[0]["image tokens"]  # the model's, unpruned
    for share in SHARES:
        count = round(share * tokens)
        overrides = {"policyc": {"policy": args.policy, "params": {args.param: count}}}
        rows.append(run(f"{args.policy} {args.param}={count} ({share:.0%})", model, overrides, requests,
                        args.max_tokens, engine))
    print(f"{model}: {args.requests} requests, {args.max_tokens} new tokens each; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(_figure(row[c]) for c in COLUMNS))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
