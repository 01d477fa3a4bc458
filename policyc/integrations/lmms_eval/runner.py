"""lmms-eval tasks evaluated from policyc's commands: `policyc eval --lmms TASKS` (a policy and a sweep of its
budgets against the unmodified model, on one loaded model) and `policyc search --lmms TASK` (each trial one
lmms-eval evaluation). lmms-eval runs in process through `simple_evaluate`; its task index includes policyc's own
tasks (`policyc_synthetic`, `policyc_synthetic_val`).

A task is named `TASK` or `TASK:METRIC`; without a metric, the first of the task's `metric_list` is the figure called
accuracy (plots, retention, the search objective).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from policyc.errors import PolicyError, suggestion


@dataclass(frozen=True)
class TaskScore:
    """One policy (or the unmodified model) on one lmms-eval task."""

    name: str  # the policy and swept value, or "unmodified"
    task: str
    metric: str
    accuracy: float  # the task's metric
    samples: int
    image_tokens: float  # means over the samples (policyc.report)
    flops_share: float
    kv_share: float

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.name, "task": self.task, "metric": self.metric, "value": self.accuracy,
                "samples": self.samples, "image_tokens_in_last_layer": self.image_tokens,
                "flops_share": self.flops_share, "kv_share": self.kv_share}


def require_lmms_eval() -> None:
    """Fail clearly where lmms-eval is not installed."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as error:
        raise PolicyError.at(f"--lmms needs lmms-eval, which cannot be imported here ({error})", None,
                             "pip install 'policyc[lmms]' (lmms-eval needs torchvision built for your torch)"
                             ) from None


def task_manager() -> Any:
    """lmms-eval's task index with policyc's tasks included."""
    from lmms_eval.tasks import TaskManager

    from policyc.integrations.lmms_eval import tasks_dir

    return TaskManager("WARNING", include_path=str(tasks_dir()))


def parse_tasks(specs: tuple[str, ...] | list[str], manager: Any) -> list[tuple[str, str | None]]:
    """`TASK` or `TASK:METRIC` names as (task, metric or None); an unknown task or metric names the closest one."""
    parsed = []
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            task, _, metric = part.partition(":")
            if task not in manager.all_tasks:
                raise PolicyError.at(f"--lmms: lmms-eval has no task '{task}'", None,
                                     suggestion(task, manager.all_tasks, "tasks"))
            metrics = [m["metric"] for m in manager._get_config(task).get("metric_list", [])]
            if metric and metrics and metric not in metrics:  # checked before any evaluation runs
                raise PolicyError.at(f"--lmms: task {task} reports no metric '{metric}'", None,
                                     suggestion(metric, metrics, "metrics"))
            parsed.append((task, metric or None))
    if not parsed:
        raise PolicyError.at("--lmms needs a task", None, "e.g. --lmms policyc_synthetic")
    return parsed


def evaluate_tasks(model: Any, tasks: list[tuple[str, str | None]], *, limit: int | None, batch_size: int,
                   manager: Any) -> list[TaskScore]:
    """`model` (a PolicycModel answering with its current policy) on `tasks`, through lmms-eval."""
    from lmms_eval.evaluator import simple_evaluate

    model.records.clear()
    model.batch_size = batch_size
    names = list(dict.fromkeys(task for task, _ in tasks))
    try:
        out = simple_evaluate(model=model, tasks=names, task_manager=manager, batch_size=batch_size, limit=limit,
                              log_samples=False, device=str(model.device), verbosity="WARNING")
    except PolicyError:
        raise
    except Exception as error:  # lmms-eval's and the data sets' own errors, named with what to do
        raise _failed(error, names, manager) from error
    if out is None or "results" not in out:
        raise PolicyError.at(f"lmms-eval returned no results for {', '.join(names)}", None)
    summary = model.summary()
    scores = []
    for task, metric in tasks:
        figures = out["results"].get(task, {})
        metrics = [m["metric"] for m in out["configs"].get(task, {}).get("metric_list", [])]
        chosen = metric or (metrics[0] if metrics else None)
        key = next((k for k in figures if k.partition(",")[0] == chosen), None)
        if key is None or not isinstance(figures[key], int | float):
            raise PolicyError.at(f"--lmms {task}: no figure '{chosen}' in lmms-eval's results", None,
                                 suggestion(str(chosen), metrics, "metrics") + f" (write {task}:METRIC)")
        costs = summary[task]
        scores.append(TaskScore(model.name, task, chosen, float(figures[key]), int(costs["samples"]),
                                costs["image_tokens"], costs["flops_share"], costs["kv_share"]))
    return scores


def _failed(error: Exception, tasks: list[str], manager: Any) -> PolicyError:
    """A PolicyError for an evaluation that raised: its deepest cause, and where each task's data comes from."""
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    first = (str(cause).strip().splitlines() or [""])[0]
    sources = ", ".join(f"{task}: {manager._get_config(task).get('dataset_path')}" for task in tasks)
    return PolicyError.at(f"lmms-eval could not evaluate {', '.join(tasks)}: {type(cause).__name__}: {first}", None,
                          f"each task's data set must be reachable or in the Hugging Face cache ({sources})")


def lmms_objective(model: Any, processor: Any, reference: str, task: str, *, limit: int | None,
                   batch_size: int) -> Any:
    """A search objective (`policyc.policy_search`'s `evaluate`): each trial one lmms-eval evaluation of `task`
    (`TASK` or `TASK:METRIC`) on `limit` documents; figures accuracy (the metric), flops, kv, image_tokens and
    latency_ms."""
    require_lmms_eval()
    from policyc.integrations.lmms_eval.model import PolicycChat

    manager = task_manager()
    tasks = parse_tasks([task], manager)
    if len(tasks) != 1:
        raise PolicyError.at("--lmms takes one task for a search", None, "e.g. --lmms policyc_synthetic_val")
    wrapper = PolicycChat(reference, loaded=(model, processor), batch_size=batch_size)

    def run(compiled: Any, candidate: Any) -> dict[str, float]:
        wrapper.use(compiled)
        start = time.perf_counter()
        (score,) = evaluate_tasks(wrapper, tasks, limit=limit, batch_size=batch_size, manager=manager)
        elapsed = time.perf_counter() - start
        return {"accuracy": score.accuracy, "flops": score.flops_share, "kv": score.kv_share,
                "image_tokens": score.image_tokens, "latency_ms": 1e3 * elapsed / max(1, score.samples)}

    return run


def eval_tasks(model_ref: str, policy: str | None, tasks: tuple[str, ...], *, limit: int | None, batch_size: int,
               assignments: dict[str, Any], device: str, json_path: Path | None,
               sweep: tuple[str, list[Any]] | None, plot: Path | None, console: Console) -> list[TaskScore]:
    """`policyc eval [MODEL] [POLICY] --lmms TASKS`: the unmodified model, then POLICY (at each swept value), on
    each task; a table, and as asked JSON and a plot of each task's metric against the FLOPs share."""
    require_lmms_eval()
    from policyc.eval_command import compiled_runs, draw
    from policyc.integrations.lmms_eval.model import PolicycChat
    from policyc.models.bundled import load_reference_model, load_reference_processor

    manager = task_manager()
    parsed = parse_tasks(tasks, manager)
    loaded = load_reference_model(model_ref, device)
    wrapper = PolicycChat(model_ref, loaded=(loaded, load_reference_processor(model_ref)), batch_size=batch_size)
    with console.status("lmms-eval: unmodified"):
        scores = evaluate_tasks(wrapper, parsed, limit=limit, batch_size=batch_size, manager=manager)
    if policy is not None:
        for label, compiled in compiled_runs(loaded, policy, assignments, sweep):
            wrapper.use(compiled, label)
            with console.status(f"lmms-eval: {escape(label)}"):
                scores += evaluate_tasks(wrapper, parsed, limit=limit, batch_size=batch_size, manager=manager)
    render(scores, console)
    by_task = {task: [s for s in scores if s.task == task] for task, _ in parsed}
    if plot is not None:
        for task, rows in by_task.items():
            path = plot if len(by_task) == 1 else plot.with_name(f"{plot.stem}-{task}{plot.suffix}")
            draw(rows, f"{task} (lmms-eval)", path, ylabel=rows[0].metric)
            console.print(f"wrote {path}")
    if json_path is not None:
        from policyc.terminal import write_json

        write_json(json_path, {"model": model_ref, "lmms_tasks": list(by_task), "limit": limit,
                               "results": [{**s.to_json(), "retention": _retention(s, by_task[s.task][0])}
                                           for s in scores]}, console)
    return scores


def _retention(score: TaskScore, unmodified: TaskScore) -> float | None:
    return score.accuracy / unmodified.accuracy if unmodified.accuracy else None


def render(scores: list[TaskScore], console: Console) -> None:
    table = Table("policy", "task", "metric", "samples", "value", "retention", "image tokens", "FLOPs share",
                  title="lmms-eval", title_justify="left")
    first = {}
    for s in scores:
        base = first.setdefault(s.task, s)
        kept = _retention(s, base)
        table.add_row(escape(s.name), escape(s.task), escape(s.metric), str(s.samples), f"{s.accuracy:.4g}",
                      "-" if kept is None else f"{kept:.1%}", f"{s.image_tokens:.1f}", f"{s.flops_share:.1%}")
    console.print(table)
