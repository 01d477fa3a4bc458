"""Search over policies with Optuna: sample concrete policies from a search space, measure each on a model,
and return the Pareto front of accuracy against cost.

A trial picks a candidate policy (the space's `choose`) and a value for each of its searchable parameters,
prints the concrete policy (canonical `.tokpol`, the values as defaults), compiles it onto the model,
evaluates it and records the objectives in the study. Results are keyed by the sha256 of the model
reference, the data and the concrete policy: a trial that samples a policy some finished trial already
measured reuses its figures instead of measuring again. The study lives in Optuna storage (a SQLite file by
default, PostgreSQL or any RDB URL to share it between workers and machines), with heartbeats, so a search
killed at any moment and started again loses no finished trial and repeats none: the trial that was
running is marked failed and its policy is measured afresh.
"""

from __future__ import annotations

import hashlib
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.lang.check import CheckedPolicy
from policyc.lang.search_counts import cap_counts
from policyc.lang.search_layers import cap_layers
from policyc.lang.search_space import CheckedSearch, SearchDimension

DIRECTIONS = {"accuracy": "maximize", "vqa_score": "maximize", "flops": "minimize", "kv": "minimize",
              "latency_ms": "minimize", "image_tokens": "minimize"}
METRIC_PREFIX = "metric:"  # user attributes of a trial that hold its measured figures
DEFAULT_STORAGE = "sqlite:///policyc-search.db"

# (compiled model, candidate) -> figures; (None, None) measures the unmodified model
Evaluate = Callable[[Any, "Candidate | None"], Mapping[str, float]]


@dataclass(frozen=True)
class Candidate:
    """A concrete policy: a candidate of the space, the parameter values a trial gave it, and its printed form."""

    name: str  # the candidate, as the search's `choose` names it
    policy: CheckedPolicy
    assignments: dict[str, ir.Expr]
    text: str  # canonical .tokpol of the policy with the values as defaults


@dataclass(frozen=True)
class TrialResult:
    number: int
    policy: str  # the candidate's name
    params: dict[str, str]  # parameter -> printed value
    text: str
    key: str  # sha256 of model, data and text
    metrics: dict[str, float]
    cached_from: int | None = None  # the trial whose measurement this one reused

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "policy": self.policy, "params": self.params, "metrics": self.metrics,
                "key": self.key, "cached_from": self.cached_from, "text": self.text}


@dataclass
class SearchResult:
    study_name: str
    storage: str
    objectives: dict[str, str]  # name -> maximize | minimize
    constraints: dict[str, float]
    trials: list[TrialResult]  # finished trials, in order
    baseline: dict[str, float] = field(default_factory=dict)  # the unmodified model's figures, when measured
    notes: list[str] = field(default_factory=list)  # how the space was fitted to the model (search_counts.py)

    def feasible(self, trial: TrialResult) -> bool:
        return all(_satisfies(trial.metrics[name], bound, direction_of(name, self.objectives))
                   for name, bound in self.constraints.items())

    @property
    def front(self) -> list[TrialResult]:
        """Feasible trials no other feasible trial dominates, one per concrete policy, best first."""
        pool = [t for t in self.trials if self.feasible(t)]
        front: dict[str, TrialResult] = {}
        for trial in pool:
            if not any(_dominates(other, trial, self.objectives) for other in pool):
                front.setdefault(trial.key, trial)
        first, direction = next(iter(self.objectives.items()))
        return sorted(front.values(), key=lambda t: t.metrics[first], reverse=direction == "maximize")


def direction_of(name: str, objectives: Mapping[str, str]) -> str:
    """Whether a figure is maximized: as an objective says, else as known (accuracy up, costs down)."""
    return objectives.get(name) or DIRECTIONS.get(name, "minimize")


def _satisfies(value: float, bound: float, direction: str) -> bool:
    return value >= bound if direction == "maximize" else value <= bound


def _dominates(a: TrialResult, b: TrialResult, objectives: Mapping[str, str]) -> bool:
    """`a` is at least as good as `b` on every objective and better on one."""
    signs = {name: (1 if d == "maximize" else -1) for name, d in objectives.items()}
    at_least = all(signs[n] * a.metrics[n] >= signs[n] * b.metrics[n] for n in objectives)
    better = any(signs[n] * a.metrics[n] > signs[n] * b.metrics[n] for n in objectives)
    return at_least and better


def directions(objectives: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Objective names with their directions: known figures have theirs; others must say (a mapping)."""
    if isinstance(objectives, Mapping):
        chosen = dict(objectives)
    else:
        unknown = [o for o in objectives if o not in DIRECTIONS]
        if unknown:
            raise PolicyError.at(f"unknown objective '{unknown[0]}'", None,
                                 f"one of {', '.join(DIRECTIONS)}, or pass {{name: 'maximize'|'minimize'}}")
        chosen = {o: DIRECTIONS[o] for o in objectives}
    bad = [d for d in chosen.values() if d not in ("maximize", "minimize")]
    if not chosen or bad:
        raise PolicyError.at("objectives need at least one name, each 'maximize' or 'minimize'", None)
    return chosen


# ---------------------------------------------------------------- sampling


def suggest_value(trial: Any, dimension: SearchDimension) -> ir.Expr:
    """A value for one dimension from its domain (Optuna parameter `CANDIDATE.PARAM`), as the IR literal a
    policy would hold: a choice's printed text, a whole number for counts, otherwise a float rounded to the
    domain's precision (`SearchDimension.literal`): the value the trial compiles is the value it prints and writes."""
    from policyc.lang.printer import print_expr

    name, domain = f"{dimension.policy}.{dimension.param}", dimension.domain
    if isinstance(domain, ir.ChoiceDomain):
        return dimension.literal(trial.suggest_categorical(name, [print_expr(o) for o in domain.options]))
    low, high, step = domain.low.value, domain.high.value, domain.step.value if domain.step else None
    whole = (isinstance(dimension.default, ir.Number) and isinstance(dimension.default.value, int)
             and all(float(v).is_integer() for v in (low, high, step or 1)))
    if whole:
        return dimension.literal(trial.suggest_int(name, int(low), int(high), step=int(step or 1), log=domain.log))
    return dimension.literal(trial.suggest_float(name, low, high, step=step, log=domain.log))


def suggest(trial: Any, space: CheckedSearch) -> Candidate:
    """The concrete policy a trial samples: a candidate, then a value for each of its dimensions."""
    from policyc.lang import concrete_policy_text

    name = trial.suggest_categorical("policy", list(space.names))
    values = {d.param: suggest_value(trial, d) for d in space.dimensions if d.policy == name}
    checked = space.candidate(name)
    assignments = space.assignments(name, values)
    return Candidate(name, checked, assignments, concrete_policy_text(checked, assignments))


def default_values(space: CheckedSearch) -> list[dict[str, Any]]:
    """Each candidate at its parameters' defaults, as Optuna parameter values (to enqueue first)."""
    from policyc.lang.printer import print_expr

    out = []
    for name in space.names:
        values: dict[str, Any] = {"policy": name}
        for d in space.dimensions:
            if d.policy == name:
                values[f"{name}.{d.param}"] = (print_expr(d.default) if isinstance(d.domain, ir.ChoiceDomain)
                                               else d.default.value)
        out.append(values)
    return out


# ---------------------------------------------------------------- evaluation


def harness(model: Any, processor: Any, items: Sequence[Any], batch_size: int = 32) -> Evaluate:
    """The evaluation harness (policyc.evaluation) as a search objective: accuracy, VQA score, FLOPs and KV
    shares, image tokens, and measured milliseconds per sample."""
    from policyc.evaluation import evaluate

    def run(compiled: Any, candidate: Candidate | None) -> dict[str, float]:
        start = time.perf_counter()
        result = evaluate(model, processor, items, compiled, candidate.name if candidate else "unmodified",
                          batch_size)
        elapsed = time.perf_counter() - start
        figures = {"accuracy": result.accuracy, "vqa_score": result.vqa_score, "flops": result.flops_share,
                   "kv": result.kv_share, "image_tokens": result.image_tokens,
                   "latency_ms": 1e3 * elapsed / max(1, len(items))}
        if candidate is None:  # the most image tokens a prompt holds bounds count parameters (search_counts.py)
            figures["image_tokens_max"] = max((p.image_tokens for p in result.predictions), default=0)
        return figures

    return run


def result_key(model_ref: str, data_key: str, text: str) -> str:
    return hashlib.sha256(f"{model_ref}\n{data_key}\n{text}".encode()).hexdigest()


# ---------------------------------------------------------------- the search


def open_study(storage: str | None, study_name: str, objectives: Mapping[str, str], sampler: Any = None,
               heartbeat: int = 10) -> Any:
    """The Optuna study `study_name` in `storage` (an RDB URL: sqlite:///FILE, postgresql://...), created or
    loaded; heartbeats mark a killed worker's trial as failed after 2 x `heartbeat` seconds."""
    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, metric names
    url = storage or DEFAULT_STORAGE
    try:
        rdb = _rdb_storage(url, heartbeat)
        return optuna.create_study(study_name=study_name, storage=rdb, sampler=sampler, load_if_exists=True,
                                   directions=list(objectives.values()))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ModuleNotFoundError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PolicyError.at(f"cannot open the search storage {_redact(url)}", None,
                             f"check the URL and that the database answers ({first[:200]})") from None
    except ValueError as error:  # a study of the same name with other directions
        raise PolicyError.at(f"study '{study_name}' in {_redact(url)} does not fit this search: {error}", None,
                             "give another --study name, or the objectives it was made with") from None


def _rdb_storage(url: str, heartbeat: int, attempts: int = 5) -> Any:
    """Optuna's RDBStorage at `url`. Workers that start together on an empty database race to create its
    tables (PostgreSQL: a unique violation on pg_type, or "relation already exists"); the loser retries
    once the winner's tables exist. Connection errors (OperationalError) are not retried."""
    import optuna
    import sqlalchemy

    def open_storage() -> Any:
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                          engine_kwargs={"pool_pre_ping": True})

    for attempt in range(attempts - 1):
        try:
            return open_storage()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    return open_storage()


def _redact(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, credentials = head.partition("://")
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}:***@{tail}" if colon else url


def _finished(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _measured(study: Any, key: str, number: int, poll: float = 0.5) -> Any:
    """A finished trial that measured the policy `key`, or None. While an earlier-numbered trial of another
    worker is measuring the same policy, wait for it (so concurrent workers never measure one policy twice);
    if it fails, None (this trial measures). An earlier running trial that has not named its policy yet may be
    about to name this one: wait until it has."""
    import optuna

    running = optuna.trial.TrialState.RUNNING
    while True:
        trials = study.get_trials(deepcopy=False)
        same = [t for t in trials if t.user_attrs.get("key") == key and t.number != number]
        done = [t for t in same if t.state == optuna.trial.TrialState.COMPLETE]
        if done:
            return min(done, key=lambda t: t.number)
        earlier = [t for t in trials if t.state == running and t.number < number
                   and t.user_attrs.get("key", key) == key]  # measuring this policy, or not keyed yet
        if not earlier:
            return None
        time.sleep(poll)
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial stops blocking after its grace period


def _result(trial: Any) -> TrialResult:
    metrics = {k.removeprefix(METRIC_PREFIX): v for k, v in trial.user_attrs.items() if k.startswith(METRIC_PREFIX)}
    params = dict(trial.user_attrs.get("params", {}))
    return TrialResult(trial.number, trial.params["policy"], params, trial.user_attrs["text"],
                       trial.user_attrs["key"], metrics, trial.user_attrs.get("cached_from"))


def search(model: Any, space: CheckedSearch, evaluate: Evaluate, *, model_ref: str, data_key: str = "",
           objectives: Sequence[str] | Mapping[str, str] = ("accuracy", "flops"),
           constraints: Mapping[str, float] | None = None, n_trials: int = 40, storage: str | None = None,
           study_name: str | None = None, sampler: Any = None, seed: int = 0, start_at_defaults: bool = True,
           heartbeat: int = 10, baseline: bool = True,
           on_trial: Callable[[TrialResult], None] | None = None) -> SearchResult:
    """Run trials until the study holds `n_trials` finished ones (other workers' count too), then return
    every finished trial and the Pareto front. Count parameters are searched up to the most image tokens a prompt
    of the baseline held, where the harness reports it (`image_tokens_max`), and layer parameters within the
    model's layers (`SearchResult.notes` say so).

    `evaluate(compiled, candidate)` measures one compiled policy (see `harness`); its figures must include
    every objective and constraint. `model_ref` and `data_key` name the model and the data in result keys.
    With `start_at_defaults`, a new study first measures every candidate at its defaults; with `baseline`,
    `evaluate(None, None)` measures the unmodified model once per study (kept in the study)."""
    import optuna

    from policyc.lang.printer import print_expr
    from policyc.models import adapt
    from policyc.runtime import compile_model

    chosen = directions(objectives)
    bounds = dict(constraints or {})
    name = study_name or space.name
    if sampler is None:
        def constraint_values(trial: optuna.trial.FrozenTrial) -> list[float]:
            return list(trial.user_attrs.get("constraints", []))

        sampler = optuna.samplers.TPESampler(seed=seed, constraints_func=constraint_values if bounds else None)
    study = open_study(storage, name, chosen, sampler, heartbeat)
    study.set_metric_names(list(chosen))
    if baseline and "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", {k: float(v) for k, v in evaluate(None, None).items()})
    space, notes = cap_counts(space, study.user_attrs.get("baseline", {}).get("image_tokens_max"))
    adapter = adapt(model)
    space, layer_notes = cap_layers(space, {"llm": len(adapter.decoder_layers), "encoder": len(adapter.vision_layers)})
    notes += layer_notes
    if start_at_defaults and not study.trials:
        for values in default_values(space):
            study.enqueue_trial(values, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        candidate = suggest(trial, space)
        key = result_key(model_ref, data_key, candidate.text)
        trial.set_user_attr("text", candidate.text)
        trial.set_user_attr("key", key)
        trial.set_user_attr("params", {p: print_expr(v) for p, v in candidate.assignments.items()})
        earlier = _measured(study, key, trial.number)
        if earlier is not None:
            figures = {k.removeprefix(METRIC_PREFIX): v for k, v in earlier.user_attrs.items()
                       if k.startswith(METRIC_PREFIX)}
            trial.set_user_attr("cached_from", earlier.number)
        else:
            compiled = compile_model(model, candidate.policy, candidate.assignments)
            try:
                figures = dict(evaluate(compiled, candidate))
            finally:
                compiled.remove()
        missing = [n for n in [*chosen, *bounds] if n not in figures]
        if missing:
            raise PolicyError.at(f"the evaluation returned no '{missing[0]}'", None,
                                 f"it returned {', '.join(figures) or 'nothing'}")
        for metric, value in figures.items():
            trial.set_user_attr(METRIC_PREFIX + metric, float(value))
        trial.set_user_attr("constraints", [_violation(figures[n], b, direction_of(n, chosen))
                                            for n, b in bounds.items()])
        return tuple(float(figures[n]) for n in chosen)

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE and on_trial is not None:
            on_trial(_result(trial))

    remaining = n_trials - len(_finished(study))
    if remaining > 0:
        states = (optuna.trial.TrialState.COMPLETE,)
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=states), report],
                       catch=())
    trials = sorted((_result(t) for t in _finished(study)), key=lambda t: t.number)
    return SearchResult(name, _redact(storage or DEFAULT_STORAGE), chosen, bounds, trials,
                        dict(study.user_attrs.get("baseline", {})), notes)


def _violation(value: float, bound: float, direction: str) -> float:
    """Optuna's constraint value: <= 0 when satisfied."""
    return (bound - value) if direction == "maximize" else (value - bound)


def load_space(reference: str | CheckedSearch) -> CheckedSearch:
    """A search space: a checked one; FILE or FILE:NAME (its `search` block, or with none, every policy of the
    file with its declared domains); or standard-library names, comma separated (`fastv,pyramiddrop`)."""
    from policyc.errors import suggestion
    from policyc.lang import Loader, check_path, check_search_path, check_stdlib
    from policyc.lang.search_space import space_from_policies

    if isinstance(reference, CheckedSearch):
        return reference
    path, _, name = reference.partition(":") if not Path(reference).is_file() else (reference, "", "")
    if Path(path).is_file():
        loader = Loader()
        searches = check_search_path(path, loader)
        if name:
            chosen = [s for s in searches if s.name == name]
            if chosen:
                return chosen[0]
            policies = [c for c in check_path(path, loader) if c.program.policy.name == name]
            if not policies:
                raise PolicyError.at(f"no search or policy '{name}' in {path}", None,
                                     suggestion(name, [s.name for s in searches], "searches"))
            return space_from_policies(policies, name)
        if len(searches) > 1:
            raise PolicyError.at(f"{path} holds {len(searches)} searches", None, f"name one: {path}:{searches[0].name}")
        return searches[0] if searches else space_from_policies(check_path(path, loader), Path(path).stem)
    stdlib = check_stdlib()
    names = [n.strip() for n in reference.split(",") if n.strip()]
    unknown = [n for n in names if n not in stdlib]
    if not names or unknown:
        bad = unknown[0] if unknown else reference
        raise PolicyError.at(f"no search-space file or standard-library policy named '{bad}'", None,
                             suggestion(bad, sorted(stdlib), "policies"))
    return space_from_policies([stdlib[n] for n in names], "_".join(names))


__all__ = ["DIRECTIONS", "Candidate", "SearchResult", "TrialResult", "default_values", "directions", "harness",
           "load_space", "open_study", "result_key", "search", "suggest", "suggest_value"]
