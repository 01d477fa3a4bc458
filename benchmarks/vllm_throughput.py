"""vLLM's offline engine with and without a policy: throughput on N synthetic requests.

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/vllm_throughput.py --requests 200 --policy fastervlm --param tokens

For the unmodified model, then POLICY at 11%, 22% and 33% of the image tokens (its parameter `--param`, a token
count), one engine each on the bundled model (policyc:default): the synthetic test questions with their images,
all submitted at once, greedy, `--max-tokens` new tokens each. Prints requests/s, prompt and output tokens/s (wall
time of `LLM.generate`), mean time to first token (vLLM's own histogram; every request is queued at once, so it
includes queueing) and KV blocks per request (ceil(tokens / block size), prompt and output). Figures, not
assertions: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
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


def run(label: str, overrides: dict[str, Any] | None, requests: list[dict[str, Any]], max_tokens: int,
        engine: dict[str, Any]) -> dict[str, Any]:
    """One engine, one generate() over every request; its figures."""
    from vllm import LLM, SamplingParams

    from policyc.models.bundled import bundled_model_dir

    llm = LLM(model=str(bundled_model_dir()), hf_overrides=overrides, disable_log_stats=False, **engine)
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
    parser.add_argument("--json", help="Write the rows here.")
    args = parser.parse_args()

    from policyc.evaluation import prompt_text, synthetic_items
    from policyc.models.bundled import DEFAULT_NAME, load_reference_processor

    processor = load_reference_processor(DEFAULT_NAME)
    items = synthetic_items("test", args.requests)
    requests = [{"prompt": prompt_text(processor, i.question), "multi_modal_data": {"image": i.image}} for i in items]
    engine = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "limit_mm_per_prompt": {"image": 1},
              "seed": 0}
    tokens = 144  # the bundled model's image tokens
    rows = [run("unmodified", None, requests, args.max_tokens, engine)]
    for share in SHARES:
        count = round(share * tokens)
        overrides = {"policyc": {"policy": args.policy, "params": {args.param: count}}}
        rows.append(run(f"{args.policy} {args.param}={count} ({share:.0%})", overrides, requests, args.max_tokens,
                        engine))
    print(f"{args.requests} requests, {args.max_tokens} new tokens each; {platform.processor() or platform.machine()}")
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
