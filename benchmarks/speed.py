"""The speed matrix of issue 6: `policyc bench` on LLaVA-1.5-7B shapes (random bf16 weights), batch 8, FastV,
PyramidDrop, VisionZip and MustDrop at the settings for 64/128/192 of 576 image tokens, eager and inductor; and
SnapKV decoding at long context (8 images, a 1024-token cache), with a dynamic and a static cache (on CUDA the static
one decodes through transformers' compiled CUDA-graph step); and the first policy at batch 1, eager, under a
whole-model torch.compile reduce-overhead (CUDA graphs) and with a static cache. Writes benchmarks/RESULTS.md and a
plot.

    python benchmarks/speed.py --device cuda                        # everything (GPU)
    python benchmarks/speed.py --device cuda --policies fastv --backends eager   # a part; results accumulate
    python benchmarks/speed.py --tiny --out /tmp/speed               # CPU smoke run of the tiny random model
    python benchmarks/speed.py --device cuda --minutes 6             # what fits a short lease, 64 tokens first

Each configuration's `policyc bench` JSON is kept in OUT/runs/ (re-running a configuration replaces it), and
OUT/RESULTS.md and OUT/speed.png are rebuilt from every JSON there, so a matrix too long for one session can be
run in parts. Settings per budget: FastV keeps that count (ratio (budget + 0.25) / 576, floored by the runtime);
VisionZip the evaluation page's dominant/contextual splits (54/10, 108/20, 162/30); PyramidDrop has fixed stages
[7, 15, 23] and a geometric lambda, so no lambda averages 64 or 128 tokens: lambda 0.3/0.4/0.5 (as
benchmarks/accuracy.py); MustDrop the paper's thresholds for each budget (count data-dependent: random weights).
The tables report what each measured. `--tiny` scales every count to the tiny model's 64 image tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from policyc.bench import Row, Settings
from policyc.bench_command import bench_command, load_bench_model
from policyc.lang.build import parse_value

BUDGETS = (64, 128, 192)
POLICIES = ("fastv", "pyramiddrop", "visionzip", "mustdrop")
FULL = 576  # LLaVA-1.5's image tokens per image


def params(policy: str, budget: int, image_tokens: int) -> dict[str, str]:
    """The parameter values of `policy` for `budget` of 576 image tokens, scaled to `image_tokens` per image."""
    index = BUDGETS.index(budget)
    if policy == "fastv":
        return {"ratio": f"{(budget + 0.25) / FULL * 100:.4f}%"}
    if policy == "visionzip":
        dominant, contextual = ((54, 10), (108, 20), (162, 30))[index]
        scale = image_tokens / FULL
        return {"dominant": str(max(1, round(dominant * scale))), "contextual": str(max(1, round(contextual * scale)))}
    if policy == "pyramiddrop":
        return {"lam": ("0.3", "0.4", "0.5")[index]}
    if policy == "mustdrop":
        g_thr, i_thr = (("0.011", "0.01"), ("0.0012", "0.001"), ("0.001", "0.001"))[index]
        return {"g_thr": g_thr, "i_thr": i_thr}
    raise ValueError(policy)


def configurations(args: argparse.Namespace, image_tokens: int) -> list[dict[str, Any]]:
    """Every (policy, budget, backend) of the matrix the options select. After the first block (every policy at
    the first budget and backend) come the batch-1 pair and the long-context decode pair: each is a target of its
    own, so a short lease (`--minutes`) reaches them before the other budgets and backends."""
    runs = [{"policy": p, "budget": b, "backend": backend, "params": params(p, b, image_tokens), "images": 1}
            for backend in args.backends for b in args.budgets for p in args.policies]
    extra: list[dict[str, Any]] = []
    if args.batch1 and runs:  # launch-bound batch 1: a dynamic cache; every row's whole forward under torch.compile
        # reduce-overhead (CUDA graphs; inductor on CPU takes minutes, so not in --tiny); a static cache (CUDA-graph
        # decode); inductor's compiled prefill with a static cache
        extra += [{**runs[0], "batch": 1, "cache": "dynamic"}]
        if not args.tiny:
            extra += [{**runs[0], "backend": "eager", "batch": 1, "cache": "dynamic", "compile": "reduce-overhead"}]
        extra += [{**runs[0], "batch": 1, "cache": "static"}]
        if "inductor" in args.backends:
            extra += [{**runs[0], "backend": "inductor", "batch": 1, "cache": "static"}]
    if args.long_context:  # a growing cache, then transformers' compiled static-cache decode (CUDA graphs)
        capacity = 128 if args.tiny else 1024
        extra += [{"policy": "snapkv", "budget": capacity, "backend": "eager", "images": 8, "cache": cache,
                   "params": {"capacity": str(capacity), "window": "32" if not args.tiny else "16"}}
                  for cache in ("dynamic", "static")]
    at = len(args.policies) if runs else 0
    return runs[:at] + extra + runs[at:]


def run_name(config: dict[str, Any]) -> str:
    """A configuration's name, that of its JSON in OUT/runs: policy-budget-backend-Nimg[-batchB-cache[-compile-MODE]
    |-static]."""
    name = f"{config['policy']}-{config['budget']}-{config['backend']}-{config['images']}img"
    if "compile" in config:
        return f"{name}-batch{config['batch']}-{config['cache']}-compile-{config['compile']}"
    if "batch" in config:
        return f"{name}-batch{config['batch']}-{config['cache']}"
    return f"{name}-static" if config.get("cache") == "static" else name


def run_matrix(args: argparse.Namespace) -> None:
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = Settings(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=args.dtype,
                    device=args.device, warmup=args.warmup, repeats=args.repeats, kernels=args.kernels)
    preloaded = load_bench_model("random", None, base) if args.tiny else load_bench_model(None, "llava-1.5-7b", base)
    from policyc.models import adapt

    image_tokens = adapt(preloaded[0]).tokens_per_image or FULL
    started = time.monotonic()
    todo = configurations(args, image_tokens)
    unmodified_rows: dict[Settings, Row] = {}  # measured once per setting, shared by the policies and backends
    for done, config in enumerate(todo):
        if done and args.minutes is not None and time.monotonic() - started > args.minutes * 60:
            print(f"--minutes {args.minutes} passed: {len(todo) - done} configuration(s) not run: "
                  + ", ".join(run_name(c) for c in todo[done:]))
            break
        settings = Settings(**{**vars(base), "backend": config["backend"], "images": config["images"],
                               "batch": config.get("batch", base.batch), "cache": config.get("cache", "dynamic"),
                               "compile": config.get("compile", "none")})
        name = run_name(config)
        assignments = {k: parse_value(v, k) for k, v in config["params"].items()}
        result = bench_command(None, config["policy"], settings=settings, assignments=assignments,
                               no_reference=config["images"] > 1 or args.no_reference, preloaded=preloaded,
                               unmodified_rows=unmodified_rows)
        (runs_dir / f"{name}.json").write_text(json.dumps({**result, "config": config}, indent=2) + "\n")


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every run in OUT/runs, ordered by image count, backend, policy and budget."""
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    order = {p: k for k, p in enumerate(POLICIES)}
    return sorted(runs, key=lambda r: (r["config"]["images"], r["config"]["backend"], -r["settings"]["batch"],
                                       r["settings"].get("cache", "dynamic"),
                                       order.get(r["config"]["policy"], len(order)), r["config"]["budget"]))


def _f(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def write_results(out: Path, tiny: bool) -> Path:
    """RESULTS.md from every run in OUT/runs: the machine, then one table row per configuration."""
    runs = load_runs(out)
    if not runs:
        raise SystemExit(f"no runs in {out / 'runs'}")
    first = runs[0]
    devices = sorted({r["device"] for r in runs})
    title = "CPU smoke run of the tiny random model (not the GPU result)" if tiny else "Speed of the compiled policies"
    lines = [f"# {title}", "", f"Written by `benchmarks/speed.py`{' --tiny' if tiny else ''}. Machine: "
             f"{first['machine']['node']} ({first['machine']['platform']}, {first['machine']['cpus']} CPUs); "
             f"device: {', '.join(devices)}; versions: "
             + ", ".join(f"{k} {v}" for k, v in first["versions"].items())
             + f"; model: {first['model']}; dates {min(r['date'] for r in runs)} to {max(r['date'] for r in runs)}.",
             "", "Times in ms (median); speedups are t_unmodified / t_row. ideal/policy is t_ideal / t_policy "
             "(prefill; target >= 0.95). ref/policy is t_reference / t_policy on time to first token (the "
             "references recompute without a cache; target >= 1.3). FLOPs and time shares are the policy's "
             "analytic prefill FLOPs and measured prefill time over the unmodified model's (issue item 6).", "",
             "| policy | budget | setting | backend | batch | img tok | prefill unmod | prefill ideal | "
             "prefill policy | "
             "speedup policy | ideal/policy | TTFT unmod | TTFT policy | TTFT ref | ref/policy | FLOPs share | "
             "time share | decode tok/s unmod | decode tok/s policy | KV MiB unmod | KV MiB policy | "
             "peak MiB unmod | peak MiB policy | recompiles |", "|" + "---|" * 24]
    for run in runs:
        rows = {r["name"]: r for r in run["rows"]}
        u, i, p, ref = rows["unmodified"], rows["ideal"], rows["policy"], rows["reference"]
        setting = " ".join(f"{k}={v}" for k, v in run["config"]["params"].items())
        if run["config"]["images"] > 1:
            setting += f", {run['config']['images']} images"
        if run["settings"].get("cache") == "static":
            setting += ", static cache"
        if run["settings"].get("compile", "none") != "none":
            skips = p.get("cudagraph_skips")
            setting += f", whole forward torch.compile {run['settings']['compile']}" + (
                "" if skips is None else f" ({skips} graph(s) without CUDA graphs)")
        share = p["prefill_s"] / u["prefill_s"] if p["prefill_s"] and u["prefill_s"] else None
        lines.append("| " + " | ".join([
            run["policy"], str(run["config"]["budget"]), setting, run["settings"]["backend"],
            str(run["settings"]["batch"]),
            _f(p["image_tokens"]), _f(u["prefill_s"], 1e3), _f(i["prefill_s"], 1e3), _f(p["prefill_s"], 1e3),
            _f(p["speedup"].get("prefill_vs_unmodified"), digits=2),
            _f(p["speedup"].get("prefill_ideal_over_policy"), digits=2), _f(u["ttft_s"], 1e3), _f(p["ttft_s"], 1e3),
            _f(ref["ttft_s"], 1e3), _f(p["speedup"].get("ttft_reference_over_policy"), digits=2),
            _f(p["flops_share"], digits=3), _f(share, digits=3), _f(u["decode_tokens_per_s"]),
            _f(p["decode_tokens_per_s"]), _f(u["kv_bytes"], 2**-20), _f(p["kv_bytes"], 2**-20),
            _f(u["peak_prefill_bytes"], 2**-20, 0), _f(p["peak_prefill_bytes"], 2**-20, 0),
            "-" if p["recompiles"] is None else str(p["recompiles"])]) + " |")
    lines += ["", *long_context_lines(runs), "", "![prefill speedups and time vs FLOPs share](speed.png)", ""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def long_context_lines(runs: list[dict[str, Any]]) -> list[str]:
    """KV memory saved by cache eviction against the share of cached positions evicted."""
    lines = []
    for run in (r for r in runs if r["config"]["images"] > 1):
        rows = {r["name"]: r for r in run["rows"]}
        u, p = rows["unmodified"], rows["policy"]
        length = u["tokens_per_layer"][0]
        cached = length + run["settings"]["gen_len"] - 1  # positions a full cache holds after generate()
        capacity = int(run["config"]["params"]["capacity"])
        evicted = 1 - min(capacity + run["settings"]["gen_len"] - 1, cached) / cached
        saved = 1 - p["kv_bytes"] / u["kv_bytes"] if u["kv_bytes"] and p["kv_bytes"] is not None else None
        gain = p["decode_tokens_per_s"] / u["decode_tokens_per_s"] \
            if p["decode_tokens_per_s"] and u["decode_tokens_per_s"] else None
        cache = run["settings"].get("cache", "dynamic")
        lines.append(f"Long context ({run['policy']}, {run['config']['images']} images, {length} prompt tokens, cache "
                     f"budget {capacity}, {cache} cache): KV memory saved {_f(saved, 100)}% against "
                     f"{_f(evicted, 100)}% of positions evicted (capacity + generated tokens kept); decode tokens/s "
                     f"x{_f(gain, digits=2)}.")
    return lines


def plot(out: Path) -> Path:
    """Prefill speedups of policy, ideal and reference per configuration; time share against FLOPs share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in load_runs(out) if r["config"]["images"] == 1]
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    def label(r: dict[str, Any]) -> str:
        extra = f" b{r['settings']['batch']} {r['settings']['cache']}" if "batch" in r["config"] else ""
        extra += " compiled" if r["settings"].get("compile", "none") != "none" else ""
        return f"{r['policy']} {r['config']['budget']} {r['settings']['backend']}{extra}"

    labels = [label(r) for r in runs]
    for offset, name, key in ((-0.25, "ideal", "prefill_vs_unmodified"), (0.0, "policy", "prefill_vs_unmodified"),
                              (0.25, "reference", "ttft_vs_unmodified")):
        values = [{x["name"]: x for x in r["rows"]}[name]["speedup"].get(key, 0.0) for r in runs]
        bars.bar([k + offset for k in range(len(runs))], values, width=0.25, label=f"{name} ({key.split('_')[0]})")
    bars.set_xticks(range(len(runs)), labels, rotation=60, ha="right", fontsize=7)
    bars.axhline(1.0, color="gray", linestyle="--")
    bars.set_ylabel("speedup over the unmodified model")
    bars.legend(fontsize=7)
    for r in runs:
        rows = {x["name"]: x for x in r["rows"]}
        p, u = rows["policy"], rows["unmodified"]
        if p["prefill_s"] and u["prefill_s"] and p["flops_share"] is not None:
            scatter.scatter(p["flops_share"], p["prefill_s"] / u["prefill_s"],
                            marker="o" if r["settings"]["backend"] == "eager" else "s")
    scatter.plot([0, 1], [0, 1], color="gray", linestyle="--")
    scatter.set_xlabel("analytic prefill FLOPs share")
    scatter.set_ylabel("measured prefill time share (o eager, s inductor)")
    figure.tight_layout()
    path = out / "speed.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument("--backends", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--kernels", default="auto", choices=["auto", "on", "off"],
                        help="policyc's scoring kernels fused by torch.compile (auto: on CUDA only).")
    parser.add_argument("--minutes", type=float, help="Start no configuration after this many minutes (a lease's "
                        "time; the first always runs): the report holds those that finished; run the rest later, "
                        "they accumulate.")
    parser.add_argument("--long-context", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run SnapKV decoding at 8 images with a 1024-token cache.")
    parser.add_argument("--batch1", action=argparse.BooleanOptionalAction, default=True,
                        help="Also run the first policy's 64-token setting at batch 1: with a dynamic cache, with "
                        "every row's whole forward under torch.compile reduce-overhead (CUDA graphs; not with "
                        "--tiny), with a static cache (on CUDA transformers compiles static-cache decode steps: CUDA "
                        "graphs), and with inductor's prefill and a static cache where inductor is a backend.")
    parser.add_argument("--report-only", action="store_true", help="Rebuild RESULTS.md and the plot from OUT/runs.")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: policyc:random, float32, batch 2, 8 text tokens, 3 new tokens, 1 run.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device, args.dtype, args.batch, args.prompt_len, args.gen_len = "cpu", "float32", 2, 8, 3
        args.warmup, args.repeats = 0, 1
    if not args.report_only:
        run_matrix(args)
    print(f"wrote {write_results(args.out, args.tiny)} and {plot(args.out)}")


if __name__ == "__main__":
    main()
