"""Times policyc's scoring kernels (policyc/kernels/) at a model's attention shapes, eager and fused by torch.compile,
next to the plain computation reference implementations use (the whole L x L softmax, GQA keys copied per head),
and checks that every version gives the same numbers. Prints a table; --json writes every figure.

    python benchmarks/kernels.py --device cuda                # LLaVA-1.5-7B shapes: batch 8, 32 heads, 640 tokens
    python benchmarks/kernels.py --device cuda --kv-heads 4 --length 4096     # a GQA model at long context
    python benchmarks/kernels.py --tiny                       # CPU smoke run (small shapes, one repeat)

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
