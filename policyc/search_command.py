"""`policyc search [MODEL] SPACE`: run a policy search on the evaluation harness and write what it found.

DIR gets trials.csv and trials.json (every finished trial: policy, parameter values, figures, result key),
pareto/NN_POLICY.tokpol (the front's concrete policies, each a policy file `policyc check` accepts), and
pareto.png (the first two objectives of every trial, the front, and the unmodified model). Without
--storage the study is DIR/study.db (SQLite): running the same command again resumes it.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from policyc import terminal
from policyc.errors import PolicyError
from policyc.policy_search import SearchResult, TrialResult


def search_command(model: str | None, space: str, *, trials: int, output: Path, storage: str | None,
                   study: str | None, data: str, split: str, limit: int, batch_size: int, objectives: list[str],
                   constraints: dict[str, float], device: str, seed: int, heartbeat: int = 10,
                   lmms: str | None = None, json_path: Path | None = None,
                   console: Console | None = None) -> SearchResult:
    """With `lmms` (TASK[:METRIC]), each trial's accuracy is that lmms-eval task's metric on `limit` documents."""
    from policyc.evaluation import load_items
    from policyc.models.bundled import DEFAULT_NAME, load_reference_model, load_reference_processor, reference_name
    from policyc.policy_search import harness, load_space, search

    console = console or terminal.console(json_path)
    checked = load_space(space)
    reference = reference_name(model) if model else DEFAULT_NAME
    if lmms and (data != "synthetic" or split != "validation"):
        raise PolicyError.at("--lmms measures accuracy on an lmms-eval task: --data and --split do not apply", None,
                             "drop --data/--split, or search on them without --lmms")
    if lmms and "vqa_score" in objectives + list(constraints):
        raise PolicyError.at("--lmms: an lmms-eval task gives one accuracy figure, not vqa_score", None,
                             "use --objective accuracy (the task's metric)")
    items = load_items(data, split, limit) if not lmms else []
    loaded = load_reference_model(reference, device)
    processor = load_reference_processor(reference)
    if lmms:
        from policyc.integrations.lmms_eval.runner import lmms_objective

        evaluate = lmms_objective(loaded, processor, reference, lmms, limit=limit, batch_size=batch_size)
        data, split = f"lmms:{lmms}", "-"
    else:
        evaluate = harness(loaded, processor, items, batch_size)
    output.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(output / 'study.db').resolve()}"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"search {escape(checked.name)}", total=trials)

        def advance(result: TrialResult) -> None:
            figures = ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items() if k in objectives)
            progress.console.print(f"trial {result.number}: {escape(result.policy)} "
                                   f"{escape(_params(result))} -> {figures}"
                                   + (f" (as trial {result.cached_from})" if result.cached_from is not None else ""))
            progress.advance(task)

        result = search(loaded, checked, evaluate, model_ref=reference, data_key=f"{data}:{split}:{limit}",
                        objectives=objectives, constraints=constraints, n_trials=trials, storage=storage,
                        study_name=study or checked.name, seed=seed, heartbeat=heartbeat,
                        on_trial=advance)
    render(result, console)
    write_results(result, output)
    console.print(f"wrote {output}/trials.csv, trials.json, pareto.png and {len(result.front)} policies in "
                  f"{output}/pareto/")
    if json_path is not None:
        terminal.write_json(json_path, results_json(result), console)
    return result


def _params(result: TrialResult) -> str:
    return " ".join(f"{k}={v}" for k, v in result.params.items())


def render(result: SearchResult, console: Console) -> None:
    for note in result.notes:  # count parameters capped at the model's image tokens
        console.print(escape(note))
    names = list(result.objectives)
    table = Table("trial", "policy", "parameters", *names, title=f"Pareto front of {escape(result.study_name)} "
                  f"({len(result.trials)} trials)", title_justify="left")
    if result.baseline:
        table.add_row("-", "unmodified", "", *(f"{result.baseline.get(n, float('nan')):.3g}" for n in names))
    for trial in result.front:
        table.add_row(str(trial.number), escape(trial.policy), escape(_params(trial)),
                      *(f"{trial.metrics[n]:.3g}" for n in names))
    console.print(table)


def results_json(result: SearchResult) -> dict[str, Any]:
    """What trials.json holds: the study, its objectives and constraints, every trial and the Pareto front."""
    return {"study": result.study_name, "storage": result.storage, "objectives": result.objectives,
            "constraints": result.constraints, "baseline": result.baseline, "notes": result.notes,
            "trials": [t.to_json() for t in result.trials], "pareto": [t.number for t in result.front]}


def write_results(result: SearchResult, directory: Path) -> None:
    """trials.csv, trials.json, pareto/*.tokpol and pareto.png in `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    metrics = sorted({m for t in result.trials for m in t.metrics})
    with (directory / "trials.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "policy", "params", *metrics, "pareto", "cached_from", "key"])
        front = {t.number for t in result.front}
        for t in result.trials:
            writer.writerow([t.number, t.policy, _params(t), *(t.metrics.get(m, "") for m in metrics),
                             t.number in front, "" if t.cached_from is None else t.cached_from, t.key])
    (directory / "trials.json").write_text(json.dumps(results_json(result), indent=2) + "\n")
    pareto = directory / "pareto"
    pareto.mkdir(exist_ok=True)
    for stale in pareto.glob("*.tokpol"):
        stale.unlink()
    for rank, trial in enumerate(result.front, 1):
        header = "".join(f"# {k}: {v:.6g}\n" for k, v in trial.metrics.items())
        (pareto / f"{rank:02d}_{trial.policy}.tokpol").write_text(
            f"# Pareto policy {rank} of search {result.study_name}, trial {trial.number}\n{header}{trial.text}")
    draw(result, directory / "pareto.png")


def draw(result: SearchResult, path: Path) -> None:
    """The first two objectives of every trial (by candidate policy), the front as a line, the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.objectives)
    if len(names) < 2:
        names = [names[0], next((m for t in result.trials for m in t.metrics if m != names[0]), names[0])]
    y, x = names[0], names[1]
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for policy in sorted({t.policy for t in result.trials}):
        points = [t for t in result.trials if t.policy == policy]
        axes.scatter([t.metrics[x] for t in points], [t.metrics[y] for t in points], s=18, alpha=0.7, label=policy)
    front = sorted(result.front, key=lambda t: t.metrics[x])
    axes.plot([t.metrics[x] for t in front], [t.metrics[y] for t in front], "k-", lw=1, label="Pareto front")
    if x in result.baseline and y in result.baseline:
        axes.scatter([result.baseline[x]], [result.baseline[y]], marker="*", s=120, c="k", label="unmodified")
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(f"search {result.study_name}: {len(result.trials)} trials")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parse_constraints(texts: tuple[str, ...]) -> dict[str, float]:
    """`--constraint flops<=0.3` / `accuracy>=0.8` as {name: bound}: an upper bound on a figure that is
    minimized, a lower bound on one that is maximized (the operator must say which)."""
    from policyc.errors import suggestion
    from policyc.policy_search import DIRECTIONS

    out: dict[str, float] = {}
    for text in texts:
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(<=|>=)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*", text)
        if match is None:
            raise PolicyError.at(f"--constraint takes NAME<=NUMBER or NAME>=NUMBER, not {text!r}", None,
                                 "e.g. --constraint flops<=0.3")
        name, operator, value = match.groups()
        if name not in DIRECTIONS:
            raise PolicyError.at(f"--constraint: unknown figure '{name}'", None,
                                 suggestion(name, list(DIRECTIONS), "figures"))
        expected = ">=" if DIRECTIONS[name] == "maximize" else "<="
        if operator != expected:
            raise PolicyError.at(f"--constraint {text!r}: {name} is {DIRECTIONS[name]}d, so bound it with "
                                 f"{expected}", None, f"e.g. --constraint {name}{expected}{value}")
        out[name] = float(value)
    return out
