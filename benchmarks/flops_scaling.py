"""Checks the compile report's analytic prefill FLOPs (policyc/report.py `prefill_flops`) against measured time: the
unmodified LLM decoder run on the row counts policies leave (64 text tokens plus 576, 320, 192, 128, 64 or 0 of 576
image tokens), each timed, next to its analytic FLOPs. Prints per count the time share and the FLOPs share of the
full prompt, a least-squares line t = a + F / throughput, and each point's distance from it; --json writes it all.

    python benchmarks/flops_scaling.py --device cuda                   # llava-1.5-7b shapes, batch 8, bf16
    python benchmarks/flops_scaling.py --device cpu --batch 1 --llm-layers 2 --dtype float32     # a CPU run
    python benchmarks/flops_scaling.py --tiny                          # smoke run on a tiny random model

Medians of --repeats forward passes after --warmup (policyc.bench.timed: CUDA-synchronized). The decoder alone is
timed (inputs_embeds in, no cache): it is what LLM-side policies shrink, and what the report's `llm` FLOPs count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch

from policyc.bench import timed, torch_dtype
from policyc.models import adapt
from policyc.report import prefill_flops

KEPT = (576, 320, 192, 128, 64, 0)  # image tokens of LLaVA-1.5's 576 a policy leaves


def build(args: argparse.Namespace) -> Any:
    """The model whose decoder is timed: a shape (random weights, `--llm-layers` decoder layers) or the tiny one."""
    from transformers import AutoModelForImageTextToText

    from policyc.models.shapes import shape_config

    if args.tiny:
        from policyc.models.random_tiny import random_model

        return random_model(banner=False)
    config = shape_config(args.shapes)
    if args.llm_layers:
        config.text_config.num_hidden_layers = args.llm_layers
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype(args.dtype),
                                                        attn_implementation="sdpa")
    return model.eval()


def fit(flops: list[float], seconds: list[float]) -> tuple[float, float, float]:
    """Least squares t = a + b F: the intercept a (s), the throughput 1 / b (FLOP/s) and R²."""
    f, t = torch.tensor(flops, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    design = torch.stack([torch.ones_like(f), f], dim=1)
    (a, b) = torch.linalg.lstsq(design, t[:, None]).solution[:, 0].tolist()
    residual = float(((t - (a + b * f)) ** 2).sum())
    total = float(((t - t.mean()) ** 2).sum())
    return a, 1 / b if b > 0 else float("inf"), 1 - residual / total if total > 0 else 1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llava-1.5-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=64, help="Text tokens of the prompt (kept by every policy).")
    parser.add_argument("--llm-layers", type=int, default=0, help="Decoder layers to build (0: the shape's own).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random LLaVA, 1 repeat.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.dtype, args.batch, args.warmup, args.repeats = "cpu", "float32", 2, 0, 1
    device = torch.device(args.device)
    model = build(args)
    adapter = adapt(model)
    image_tokens = adapter.tokens_per_image or 0
    kept_counts = [round(k * image_tokens / 576) for k in KEPT]
    width = model.get_input_embeddings().embedding_dim
    dtype = next(model.parameters()).dtype
    points = []
    for kept in kept_counts:
        rows = args.text + kept
        embeds = torch.randn(args.batch, rows, width, device=device, dtype=dtype)
        seconds, _, _, _ = timed(lambda e=embeds: adapter.decoder(inputs_embeds=e, use_cache=False), device,
                                 args.warmup, args.repeats)
        flops = prefill_flops(adapter, [rows] * len(adapter.decoder_layers), args.batch).llm
        points.append({"image_tokens": kept, "rows": rows, "seconds": seconds, "flops": flops})
    intercept, throughput, r2 = fit([p["flops"] for p in points], [p["seconds"] for p in points])
    full = points[0]
    for p in points:
        p["time_share"], p["flops_share"] = p["seconds"] / full["seconds"], p["flops"] / full["flops"]
        p["fit_error"] = p["seconds"] / (intercept + p["flops"] / throughput) - 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"{where}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, "
          f"{'tiny' if args.tiny else args.shapes} decoder ({len(adapter.decoder_layers)} layers), {args.text} text "
          f"tokens; medians of {args.repeats}")
    print(f"| image tokens | rows | ms | GFLOP | time share | FLOPs share | off the line |\n|{'---|' * 7}")
    for p in points:
        print(f"| {p['image_tokens']} | {p['rows']} | {p['seconds'] * 1e3:.2f} | {p['flops'] / 1e9:.1f} | "
              f"{p['time_share']:.3f} | {p['flops_share']:.3f} | {p['fit_error']:+.1%} |")
    print(f"line: t = {intercept * 1e3:.2f} ms + FLOPs / {throughput / 1e12:.3f} TFLOP/s, R² = {r2:.4f}")
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": where,
              "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
              "points": points, "intercept_s": intercept, "throughput_flops": throughput, "r2": r2}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
