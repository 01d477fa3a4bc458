"""`policyc eval [MODEL] [POLICY]`: accuracy of POLICY compiled onto MODEL next to the unmodified model's, on
the synthetic scenes or a JSONL data set, with the image tokens and prefill FLOPs each keeps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from policyc import terminal
from policyc.errors import PolicyError
from policyc.evaluation import Evaluation, evaluate, load_items, retention
from policyc.lang import ir
from policyc.lang.printer import print_expr
from policyc.models.bundled import load_reference_model, load_reference_processor
from policyc.run import resolve_target


def eval_command(model: str | None, policy: str | None, *, data: str, split: str, limit: int | None,
                 batch_size: int, assignments: dict[str, ir.Expr], device: str, json_path: Path | None,
                 sweep: tuple[str, list[ir.Expr]] | None = None, plot: Path | None = None,
                 lmms: tuple[str, ...] = (), console: Console | None = None) -> list[Any]:
    """Evaluate the unmodified model, then POLICY (at each value of a swept parameter); print, write JSON
    and draw accuracy against FLOPs share as asked. With `lmms` tasks, lmms-eval evaluates them instead of
    `data` (policyc.integrations.lmms_eval.runner)."""
    console = console or terminal.console(json_path)
    target = resolve_target(model, policy)
    if target.artifact is not None:
        raise PolicyError.at("policyc eval takes MODEL and POLICY, not a compile artifact", None,
                             "evaluate the artifact's model and policy by name")
    if target.policy is None and (assignments or sweep):
        raise PolicyError.at("--param and --sweep need a POLICY", None, "e.g. policyc eval fastv --param ratio=25%")
    if lmms:
        from policyc.integrations.lmms_eval.runner import eval_tasks

        if data != "synthetic" or split != "test":
            raise PolicyError.at("--lmms evaluates lmms-eval tasks: --data and --split do not apply", None,
                                 "drop --data/--split, or evaluate them without --lmms")

        return eval_tasks(target.model, target.policy, lmms, limit=limit, batch_size=batch_size,
                          assignments=assignments, device=device, json_path=json_path, sweep=sweep, plot=plot,
                          console=console)
    items = load_items(data, split, limit)
    loaded = load_reference_model(target.model, device)
    processor = load_reference_processor(target.model)
    results: list[Evaluation] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        def run(name: str, compiled: Any | None) -> Evaluation:
            task = progress.add_task(f"{name}", total=len(items))
            return evaluate(loaded, processor, items, compiled, name, batch_size,
                            progress=lambda n: progress.advance(task, n))

        results.append(run("unmodified", None))
        if target.policy is not None:
            for label, compiled in compiled_runs(loaded, target.policy, assignments, sweep):
                results.append(run(label, compiled))
    title = f"{data} ({split})" if data == "synthetic" else data
    render(results, title, console)
    if plot is not None:
        draw(results, title, plot)
        console.print(f"wrote {plot}")
    if json_path is not None:
        base = results[0]
        terminal.write_json(json_path, {"model": target.model, "data": data, "split": split, "results": [
            {**r.to_json(), "retention": retention(r, base)} for r in results]}, console)
    return results


def compiled_runs(model: Any, policy: str, assignments: dict[str, ir.Expr],
                  sweep: tuple[str, list[ir.Expr]] | None) -> Iterator[tuple[str, Any]]:
    """POLICY compiled onto `model` once, or at each value of the swept parameter: (label, CompiledModel), each
    removed from the model once the caller moves on."""
    from policyc.runtime import compile_model
    from policyc.show import find_policies

    found = find_policies(policy)
    if len(found) != 1:
        raise PolicyError.at(f"{policy} holds {len(found)} policies", None,
                             f"name one: {policy}:{found[0].program.policy.name}")
    name, values = sweep if sweep is not None else ("", [None])
    for value in values:
        settings = {**assignments, name: value} if value is not None else assignments
        compiled = compile_model(model, found[0], settings)  # type: ignore[arg-type]
        label = compiled.plan.name + (f" {name}={print_expr(value)}" if value is not None else "")
        try:
            yield label, compiled
        finally:
            compiled.remove()


def render(results: list[Evaluation], data: str, console: Console) -> None:
    table = Table("policy", "samples", "accuracy", "retention", "VQA score", "image tokens",
                  "FLOPs share", title=f"accuracy on {escape(data)}", title_justify="left")
    base = results[0]
    for r in results:
        kept = retention(r, base)
        table.add_row(escape(r.name), str(len(r.predictions)), f"{r.accuracy:.1%}",
                      "-" if kept is None else f"{kept:.1%}", f"{r.vqa_score:.1%}", f"{r.image_tokens:.1f}",
                      f"{r.flops_share:.1%}")
    console.print(table)
    kinds = sorted({k for r in results for k in r.by_kind()})
    if kinds:
        by_kind = Table("policy", *kinds, title="accuracy by question kind", title_justify="left")
        for r in results:
            shares = r.by_kind()
            by_kind.add_row(escape(r.name), *(f"{shares[k]:.1%}" if k in shares else "-" for k in kinds))
        console.print(by_kind)


def draw(results: Sequence[Any], title: str, path: Path, ylabel: str = "accuracy (exact match)") -> None:
    """Accuracy against analytic prefill FLOPs share, one point per evaluation (each with `name`, `accuracy` and
    `flops_share`; the first is the unmodified model's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    policy = results[-1].name.partition(" ")[0]
    axes.plot([r.flops_share for r in results[1:]], [r.accuracy for r in results[1:]], "o-", label=policy)
    for r in results[1:]:
        axes.annotate(r.name.partition(" ")[2], (r.flops_share, r.accuracy), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    axes.axhline(results[0].accuracy, color="gray", linestyle="--", label="unmodified")
    axes.set_xlabel("analytic prefill FLOPs share")
    axes.set_ylabel(ylabel)
    axes.set_title(f"accuracy on {title}")
    axes.set_xlim(0, 1.05)
    if all(0 <= r.accuracy <= 1 for r in results):  # a share; other metrics (MME's scores) keep their own scale
        axes.set_ylim(0, 1.05)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
