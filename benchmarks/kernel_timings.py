"""Times policyc's scoring kernels (policyc/kernels/) at a model's attention shapes, eager and fused by torch.compile,
next to the plain computation reference implementations use (the whole L x L softmax, GQA keys copied per head),
and checks that every version gives the same numbers. Prints a table; --json writes every figure.

    python benchmarks/kernel_timings.py --device cuda          # LLaVA-1.5-7B shapes: batch 8, 32 heads, 640 tokens
    python benchmarks/kernel_timings.py --device cuda --kv-heads 4 --length 4096     # a GQA model at long context
    python benchmarks/kernel_timings.py --tiny                 # CPU smoke run (small shapes, one repeat)

Medians of --repeats runs after --warmup, CUDA-synchronized (policyc.bench.timed); the first fused call's compile time
and the graphs compiled during the timed fused runs are reported apart.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from policyc.bench import synchronize, timed
from policyc.kernels import KERNELS, column_sums, set_fusion


def plain_rows(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: torch.Tensor) -> torch.Tensor:
    """What reference implementations do: eager attention's whole causal [B, H, L, L] softmax, then the rows kept."""
    length = query.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    probabilities = torch.softmax((query.float() @ keys.float().transpose(-1, -2) * scaling)
                                  .masked_fill(~causal, float("-inf")), -1)
    return torch.gather(probabilities, 2, rows[:, None, :, None].expand(-1, query.shape[1], -1, length))


def plain_columns(query: torch.Tensor, key: torch.Tensor, scaling: float, visible: torch.Tensor) -> torch.Tensor:
    """The whole [B, H, L, L] softmax summed over rows, per key/value head (H2O's reference)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    keys = key.repeat_interleave(heads // kv_heads, dim=1)
    probabilities = torch.softmax((query.float() @ keys.float().transpose(-1, -2) * scaling)
                                  .masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    summed = probabilities.sum(2)
    return summed.view(query.shape[0], kv_heads, heads // kv_heads, -1).sum(2)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--length", type=int, default=640)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text-rows", type=int, default=64, help="Query rows of the multi-row case (SparseVLM).")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: small shapes, eager and fused, 1 run.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.batch, args.heads, args.kv_heads, args.length, args.head_dim = "cpu", 2, 4, 2, 48, 16
        args.text_rows, args.dtype, args.warmup, args.repeats = 8, "float32", 0, 1
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    query = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    key = torch.randn((args.batch, args.kv_heads, args.length, args.head_dim), generator=generator, device=device,
                      dtype=dtype)
    scaling = args.head_dim**-0.5
    causal = torch.ones(args.length, args.length, dtype=torch.bool, device=device).tril()
    results = []
    for name, rows in (("attention_rows, last row (FastV)", [args.length - 1]),
                       (f"attention_rows, last {args.text_rows} rows (SparseVLM)",
                        list(range(args.length - args.text_rows, args.length)))):
        index = torch.tensor(rows, device=device)[None].expand(args.batch, -1)
        visible = causal[index[0]][None].expand(args.batch, -1, -1)
        results.append(compare(name, args, device, lambda i=index: plain_rows(query, key, scaling, i),
                               lambda i=index, v=visible: KERNELS["attention_rows"](query, key, scaling, i, v)))
    all_visible = causal[None, None].expand(args.batch, 1, -1, -1)
    results.append(compare("column sums, every row (H2O)", args, device,
                           lambda: plain_columns(query, key, scaling, all_visible),
                           lambda: column_sums(query, key, scaling, all_visible)))
    results += selection_rows(args, device, dtype, generator)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch "
          f"{torch.__version__}, {args.dtype}, batch {args.batch}, heads {args.heads}/{args.kv_heads}, length "
          f"{args.length}, head dim {args.head_dim}; medians of {args.repeats}")
    print(f"| op | plain ms | eager ms | fused ms | fused compile s | fused recompiles | plain/fused | max abs diff | "
          f"plain peak MiB | fused peak MiB |\n|{'---|' * 10}")
    for r in results:
        print(f"| {r['op']} | {r['plain_ms']:.3f} | {r['eager_ms']:.3f} | {r['fused_ms']:.3f} | "
              f"{r['compile_s']:.1f} | {r['fused_recompiles']} | {r['plain_ms'] / r['fused_ms']:.2f}x | "
              f"{r['max_abs_diff']:.2e} | {_mib(r['plain_peak_bytes'])} | {_mib(r['fused_peak_bytes'])} |")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "settings": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2) + "\n")
    return results


def selection_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   generator: torch.Generator) -> list[dict[str, Any]]:
    """The selection kernels at LLaVA-1.5's shapes (576 image tokens of a 640-token prompt, ToMe on CLIP ViT-L/14's
    577 rows with 64-wide head-mean keys; 32 image tokens with --tiny) next to what reference codes do."""
    images, keep_count = (576, 64) if not args.tiny else (32, 8)
    score = torch.randn(args.batch, images, generator=generator, device=device, dtype=dtype)
    among = torch.ones_like(score, dtype=torch.bool)
    counts = torch.full((args.batch,), keep_count, device=device)
    keep = torch.ones(args.batch, args.length, dtype=torch.bool, device=device)
    keep[:, args.length - images - 8: args.length - 8] = KERNELS["top_ranked"](score, among, counts)
    metric = torch.nn.functional.normalize(torch.randn(args.batch, images + 1, args.head_dim // 2,
                                                       generator=generator, device=device, dtype=dtype), dim=-1)
    everyone = torch.ones(metric.shape[:2], dtype=torch.bool, device=device)
    width = int(keep.sum(1).max())
    return [
        compare(f"top_ranked, {keep_count} of {images} (FastV)", args, device,
                lambda: plain_top(score, keep_count),
                lambda: KERNELS["top_ranked"](score, among, counts).float()),
        compare(f"kept_rows, {width} of {args.length}", args, device,
                lambda: plain_kept_rows(keep, width),
                lambda: KERNELS["kept_rows"](keep, width).float()),
        compare(f"bipartite_match, {images + 1} rows (ToMe)", args, device,
                lambda: plain_match(metric),
                lambda: torch.cat(KERNELS["bipartite_match"](metric, everyone, everyone)[:2], dim=1).float()),
    ]


def plain_top(score: torch.Tensor, count: int) -> torch.Tensor:
    """FastV's reference: topk, then a mask of the chosen tokens."""
    chosen = score.topk(count, dim=1).indices.sort(1).values
    return torch.zeros_like(score, dtype=torch.float32).scatter(1, chosen, 1.0)


def plain_kept_rows(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Sorting the kept rows first, then sorting the first `width` back into order."""
    first = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return first.sort(1).values.float()


def plain_match(metric: torch.Tensor) -> torch.Tensor:
    """ToMe's bipartite soft matching: the A x B similarity, each A row's best B row (no mask: every row may merge)."""
    best, match = (metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)).max(-1)
    return torch.cat([best.float(), match.float()], dim=1)


def compare(name: str, args: argparse.Namespace, device: torch.device, plain: Callable[[], torch.Tensor],
            kernel: Callable[[], torch.Tensor]) -> dict[str, Any]:
    """Time the plain computation, the kernel eager and the kernel fused (policyc.bench.timed: medians, peak CUDA
    memory over the timed calls, graphs compiled during them); the largest difference between them."""
    set_fusion("off")
    plain_s, plain_peak, expected, _ = timed(plain, device, args.warmup, args.repeats)
    eager_s, _, eager, _ = timed(kernel, device, args.warmup, args.repeats)
    set_fusion("on")
    start = time.perf_counter()
    with torch.no_grad():  # as timed() calls it: grad mode is part of what the compiled code guards on
        kernel()  # compiles
    synchronize(device)
    compile_s = time.perf_counter() - start
    fused_s, fused_peak, fused, recompiles = timed(kernel, device, args.warmup, args.repeats)
    set_fusion("auto")
    diff = max(float((eager - expected).abs().max()), float((fused - expected).abs().max()))
    return {"op": name, "plain_ms": plain_s * 1e3, "eager_ms": eager_s * 1e3, "fused_ms": fused_s * 1e3,
            "compile_s": compile_s, "fused_recompiles": recompiles, "max_abs_diff": diff,
            "plain_peak_bytes": plain_peak, "fused_peak_bytes": fused_peak}


def _mib(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**20:.0f}"


if __name__ == "__main__":
    main()
