"""Accuracy retention of the standard library on the bundled model, at three budgets (docs/howto/evaluate.md).

    python benchmarks/accuracy.py --limit 500 --out benchmarks/ACCURACY.md --plot docs/retention.png

Each method runs at settings that keep about 11%, 22% and 33% of the 144 image tokens (16, 32, 48: LLaVA's
64/128/192 of 576); methods whose knob is not a token count (PyramidDrop's lambda, ToMe's r, pooling's window)
run at the nearest settings they have, and the table reports what each
measured: image tokens at the LLM's last layer, mean image tokens over the LLM's layers, the analytic
prefill FLOPs share, accuracy and retention (accuracy over the unmodified model's), on the synthetic test split.
MustDrop and SparseVLM are left out: their code's LLM layers (2, 6, 10, 14 and 2, 6, 15) do not exist in the
bundled model's 8-layer LLM.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from policyc.evaluation import Evaluation, evaluate, load_items, retention
from policyc.lang import check_stdlib
from policyc.lang.build import parse_value
from policyc.models.bundled import DEFAULT_NAME, load_reference_model, load_reference_processor
from policyc.runtime import compile_model

BUDGETS = ("11%", "22%", "33%")
SETTINGS: dict[str, list[dict[str, str]]] = {  # per method, one setting per budget
    "fastv": [{"ratio": b} for b in BUDGETS],
    "pyramiddrop": [{"lam": "0.3"}, {"lam": "0.4"}, {"lam": "0.5"}],
    "visionzip": [{"dominant": "13", "contextual": "3"}, {"dominant": "27", "contextual": "5"},
                  {"dominant": "40", "contextual": "8"}],
    "tome": [{"r": "6"}, {"r": "5"}, {"r": "4"}],
    "divprune": [{"ratio": b} for b in BUDGETS],
    "random_drop": [{"ratio": b} for b in BUDGETS],
    "grid": [{"ratio": b} for b in BUDGETS],
    "pool": [{"size": "3"}, {"size": "2"}],
}


def run(limit: int, batch_size: int, device: str) -> tuple[Evaluation, list[tuple[str, str, Evaluation]]]:
    model = load_reference_model(DEFAULT_NAME, device)
    processor = load_reference_processor(DEFAULT_NAME)
    items = load_items("synthetic", "test", limit)
    stdlib = check_stdlib()
    base = evaluate(model, processor, items, None, "unmodified", batch_size)
    print(f"unmodified: accuracy {base.accuracy:.3f}", flush=True)
    rows = []
    for name, settings in SETTINGS.items():
        for setting in settings:
            assignments = {k: parse_value(v, k) for k, v in setting.items()}
            compiled = compile_model(model, stdlib[name], assignments)
            label = " ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
            try:
                result = evaluate(model, processor, items, compiled, name, batch_size)
            finally:
                compiled.remove()
            rows.append((name, label, result))
            print(f"{name} {label}: accuracy {result.accuracy:.3f}, image tokens {result.image_tokens:.1f}, "
                  f"FLOPs {result.flops_share:.3f}", flush=True)
    return base, rows


def markdown(base: Evaluation, rows: list[tuple[str, str, Evaluation]], limit: int, seconds: float,
             machine: str) -> str:
    lines = [f"Bundled model (policyc:default), synthetic test split, {limit} questions; unmodified accuracy "
             f"**{base.accuracy:.1%}**. Measured {time.strftime('%Y-%m-%d')} on {machine} in {seconds:.0f} s "
             "(`python benchmarks/accuracy.py`).", "",
             "| method | setting | image tokens (last layer) | KV share | FLOPs share | accuracy | retention |",
             "|---|---|---|---|---|---|---|"]
    for name, label, r in rows:
        kept = retention(r, base)
        lines.append(f"| {name} | {label} | {r.image_tokens:.1f} of 144 | {r.kv_share:.1%} | {r.flops_share:.1%} "
                     f"| {r.accuracy:.1%} | {'-' if kept is None else f'{kept:.1%}'} |")
    return "\n".join(lines) + "\n"


def plot(base: Evaluation, rows: list[tuple[str, str, Evaluation]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in dict.fromkeys(n for n, _, _ in rows):
        points = sorted(((r.image_tokens / 144, retention(r, base) or 0.0) for n, _, r in rows if n == name))
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name, ms=4)
    axes.axhline(1.0, color="gray", linestyle="--", lw=1)
    axes.set_xlabel("share of the 144 image tokens reaching the LLM's last layer")
    axes.set_ylabel("accuracy retention (vs unmodified)")
    axes.set_title(f"bundled model, synthetic test split (unmodified {base.accuracy:.1%})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ACCURACY.md"))
    parser.add_argument("--plot", type=Path, default=Path("docs/retention.png"))
    args = parser.parse_args()
    start = time.time()
    base, rows = run(args.limit, args.batch_size, args.device)
    machine = f"{platform.machine()} {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    text = markdown(base, rows, args.limit, time.time() - start, machine)
    args.out.write_text(text)
    plot(base, rows, args.plot)
    print(text)


if __name__ == "__main__":
    main()
