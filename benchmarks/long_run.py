"""Memory over many generate() calls with a compiled model: does anything accumulate?

    python benchmarks/long_run.py --calls 1000 --policy mustdrop

Runs POLICY compiled onto the random embedded model (policyc:random), `--calls` greedy generate() calls on
the example image
(alternating two prompts of different lengths, batch 2 with left padding), and every `--every` calls records
the process's resident memory (/proc/self/statm), the Python heap (tracemalloc) and the live tensor count
(gc), plus CUDA allocated memory on a GPU. Prints a table and the growth from the first sample to the last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
import tracemalloc
import warnings
from pathlib import Path

import torch


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns about deprecations
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--policy", default="mustdrop")
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from PIL import Image

    import policyc
    from policyc.models.bundled import example_image_path
    from policyc.models.random_tiny import random_model, random_processor

    model, processor = random_model(args.device, banner=False), random_processor()
    policyc.compile(model, args.policy)
    image = Image.open(example_image_path()).convert("RGB")
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
               "text": text}]}], add_generation_prompt=True) for text in ("what color is the triangle ?",
                                                                          "how many squares are there in it ?")]
    batches = [processor(images=[image, image], text=[p, prompts[1 - i]], padding=True, return_tensors="pt")
               for i, p in enumerate(prompts)]
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    tracemalloc.start()
    rows, start = [], time.time()
    for call in range(args.calls + 1):
        if call % args.every == 0:
            heap, _ = tracemalloc.get_traced_memory()
            row = {"calls": call, "rss_mib": round(resident_mib(), 1), "python_heap_mib": round(heap / 2**20, 2),
                   "live_tensors": live_tensors(), "seconds": round(time.time() - start, 1)}
            if args.device.startswith("cuda"):
                row["cuda_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if call < args.calls:
            with torch.no_grad():
                model.generate(**batches[call % 2], max_new_tokens=args.max_new_tokens, do_sample=False)
    first, last = rows[1] if len(rows) > 2 else rows[0], rows[-1]  # after warm-up (the first 100 calls)
    summary = {"policy": args.policy, "device": args.device, "machine": platform.machine(),
               "max_new_tokens": args.max_new_tokens,
               "torch": torch.__version__, "calls": args.calls, "samples": rows,
               "growth_after_warmup": {k: round(last[k] - first[k], 2) for k in last if k not in ("calls", "seconds")}}
    print("growth from call", first["calls"], "to", last["calls"], ":", summary["growth_after_warmup"])
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
