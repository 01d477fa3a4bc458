"""`policyc eval [MODEL] [POLICY]`: accuracy of POLICY compiled onto MODEL next to the unmodified model's, on
the synthetic scenes or a JSONL data set, with the image tokens and prefill FLOPs each keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from policyc.errors import PolicyError
from policyc.evaluation import Evaluation, evaluate, load_items, retention
from policyc.lang import ir
from policyc.run import load_model_for, load_processor, resolve_target


def eval_command(model: str | None, policy: str | None, *, data: str, split: str, limit: int | None,
                 batch_size: int, assignments: dict[str, ir.Expr], device: str, json_path: Path | None,
                 console: Console | None = None) -> list[Evaluation]:
    from policyc.runtime import compile_model
    from policyc.show import find_policies

    console = console or Console()
    target = resolve_target(model, policy)
    if target.artifact is not None:
        raise PolicyError.at("policyc eval takes MODEL and POLICY, not a compile artifact", None,
                             "evaluate the artifact's model and policy by name")
    if target.policy is None and assignments:
        raise PolicyError.at("--param needs a POLICY", None, "e.g. policyc eval fastv --param ratio=25%")
    items = load_items(data, split, limit)
    loaded = load_model_for(target.model, device)
    processor = load_processor(target.model)
    results: list[Evaluation] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        def run(name: str, compiled: Any | None) -> Evaluation:
            task = progress.add_task(f"{name}", total=len(items))
            return evaluate(loaded, processor, items, compiled, name, batch_size,
                            progress=lambda n: progress.advance(task, n))

        results.append(run("unmodified", None))
        if target.policy is not None:
            found = find_policies(target.policy)
            if len(found) != 1:
                raise PolicyError.at(f"{target.policy} holds {len(found)} policies", None,
                                     f"name one: {target.policy}:{found[0].program.policy.name}")
            compiled = compile_model(loaded, found[0], assignments)  # type: ignore[arg-type]
            try:
                results.append(run(compiled.plan.name, compiled))
            finally:
                compiled.remove()
    render(results, f"{data} ({split})" if data == "synthetic" else data, console)
    if json_path is not None:
        base = results[0]
        json_path.write_text(json.dumps({"model": target.model, "data": data, "split": split, "results": [
            {**r.to_json(), "retention": retention(r, base)} for r in results]}, indent=2) + "\n")
    return results


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
