"""Policy search (policyc.search and policyc.policy_search, `policyc search`): trials on a real model through
the evaluation harness, the Pareto front, outputs that are valid policies, results reused by key, clear
errors, and a search killed with SIGKILL that resumes without losing or repeating a finished trial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import policyc
from policyc.errors import PolicyError
from policyc.evaluation import synthetic_items
from policyc.lang import check_source
from policyc.models.random_tiny import random_model, random_processor
from policyc.policy_search import TrialResult, harness, load_space, search
from policyc.search_command import parse_constraints, write_results

SPACE = """
policy keep_some {
  param ratio = 50% in [10%, 90%] step 10%
  stage llm.layer[1] {
    keep top ratio of vision by attention(last -> vision)
  }
}

policy two_ways {
  param rows = last in {last, all}
  stage llm.layer[1] {
    keep top 25% of vision by attention(rows -> vision)
  }
}

search both {
  choose { keep_some, two_ways }
}
"""


@pytest.fixture(scope="module")
def model_and_processor() -> tuple[object, object]:
    return random_model(banner=False), random_processor()


def sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def dominates(a: TrialResult, b: TrialResult) -> bool:
    return (a.metrics["accuracy"] >= b.metrics["accuracy"] and a.metrics["flops"] <= b.metrics["flops"]
            and (a.metrics["accuracy"] > b.metrics["accuracy"] or a.metrics["flops"] < b.metrics["flops"]))


def test_search_measures_trials_and_returns_a_front_of_valid_policies(model_and_processor, tmp_path: Path) -> None:
    model, processor = model_and_processor
    space_file = tmp_path / "space.tokpol"
    space_file.write_text(SPACE)
    space = load_space(f"{space_file}:both")
    evaluate = harness(model, processor, synthetic_items("validation", 3), batch_size=3)
    result = search(model, space, evaluate, model_ref="policyc:default", n_trials=7,
                    storage=sqlite(tmp_path / "s.db"))
    assert len(result.trials) == 7 and result.baseline["flops"] == 1.0
    # the candidates at their defaults come first
    assert [(t.policy, t.params) for t in result.trials[:2]] == [("keep_some", {"ratio": "50%"}),
                                                                 ("two_ways", {"rows": "last"})]
    for trial in result.trials:
        assert 0 < trial.metrics["flops"] < 1 and 0 <= trial.metrics["accuracy"] <= 1
        (checked,) = check_source(trial.text)  # every trial is a concrete policy file
        assert checked.program.policy.name == trial.policy
    front = result.front
    assert front and all(not any(dominates(o, t) for o in result.trials) for t in front)
    assert all(any(dominates(f, t) or f.key == t.key or f.metrics == t.metrics for f in front)
               for t in result.trials)
    write_results(result, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert len(rows) == 7 and sum(r["pareto"] == "True" for r in rows) == len(front)
    saved = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert saved["pareto"] == [t.number for t in front]
    files = sorted((tmp_path / "out" / "pareto").glob("*.tokpol"))
    assert len(files) == len(front) and all(check_source(f.read_text()) for f in files)
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000


def test_a_policy_measured_once_is_reused_not_measured_again(model_and_processor, tmp_path: Path) -> None:
    model, processor = model_and_processor
    measure = harness(model, processor, synthetic_items("validation", 2), batch_size=2)
    measured: list[str] = []

    def counting(compiled, candidate):  # type: ignore[no-untyped-def]
        measured.append(candidate.text if candidate else "unmodified")
        return measure(compiled, candidate)

    # two_ways has one parameter with two values: two concrete policies in all
    text = SPACE.replace("choose { keep_some, two_ways }", "choose { two_ways }")
    (tmp_path / "one.tokpol").write_text(text)
    space = load_space(f"{tmp_path / 'one.tokpol'}:both")
    result = search(model, space, counting, model_ref="m", n_trials=6, storage=sqlite(tmp_path / "c.db"))
    texts = [t for t in measured if t != "unmodified"]
    assert len(result.trials) == 6 and len(texts) == len(set(texts)) <= 2  # two concrete policies exist
    assert sum(t.cached_from is not None for t in result.trials) == 6 - len(texts)
    again = search(model, space, counting, model_ref="m", n_trials=6, storage=sqlite(tmp_path / "c.db"))
    assert [t.to_json() for t in again.trials] == [t.to_json() for t in result.trials]  # finished: nothing run


BOUNDED = """
policy bounded {
  param share = 50% in [10%, 90%]
  param count = 2000 in [1, 5000]
  stage llm.layer[1] {
    keep top share of vision by attention(last -> vision)
    keep top count of vision by attention(last -> vision)
  }
}
"""


def test_values_are_written_as_used_and_counts_stop_at_the_image_tokens(model_and_processor, tmp_path: Path) -> None:
    model, processor = model_and_processor
    (tmp_path / "bounded.tokpol").write_text(BOUNDED)
    measure = harness(model, processor, synthetic_items("validation", 2), batch_size=2)
    used: list[tuple[dict, str]] = []

    def recording(compiled, candidate):  # type: ignore[no-untyped-def]
        if candidate is not None:
            used.append((candidate.assignments, candidate.text))
        return measure(compiled, candidate)

    result = search(model, load_space(str(tmp_path / "bounded.tokpol")), recording, model_ref="m", n_trials=5,
                    storage=sqlite(tmp_path / "b.db"))
    most = int(result.baseline["image_tokens_max"])
    assert most == model.config.image_seq_length  # one image per prompt
    assert result.notes == [f"bounded.count searched in [1, {most}], not [1, 5000]: a prompt holds at most {most} "
                            "image tokens, and a larger count keeps them all"]
    assert result.trials[0].params == {"share": "50%", "count": str(most)}  # the default, capped
    for trial in result.trials:
        assert 1 <= int(trial.params["count"]) <= most
        share = trial.params["share"].removesuffix("%")
        assert len(share.partition(".")[2]) <= 2  # [10%, 90%]: hundredths of a percent at most
        assert f"param share = {trial.params['share']} in [10%, 90%]" in trial.text
    for assignments, text in used:  # the values compiled are the values written
        (written,) = check_source(text)
        defaults = {p.name: p.default for p in written.program.policy.params}
        assert defaults == assignments
    write_results(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "trials.json").read_text())["notes"] == result.notes
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [r["params"] for r in rows] == [f"share={t.params['share']} count={t.params['count']}"
                                           for t in result.trials]


def test_python_api_with_a_model_reference(tmp_path: Path) -> None:
    result = policyc.search("default", "fastv", limit=2, batch_size=2, n_trials=3,
                            storage=sqlite(tmp_path / "api.db"), objectives={"accuracy": "maximize", "kv": "minimize"})
    assert len(result.trials) == 3 and set(result.objectives) == {"accuracy", "kv"}
    assert all(0 < t.metrics["kv"] < 1 for t in result.trials)


def test_errors_are_clear(model_and_processor, tmp_path: Path) -> None:
    model, _ = model_and_processor
    with pytest.raises(PolicyError, match=r"(?s)unknown figure 'flop'.*did you mean 'flops'"):
        parse_constraints(("flop<=0.3",))
    with pytest.raises(PolicyError, match="accuracy is maximized, so bound it with >="):
        parse_constraints(("accuracy<=0.3",))
    assert parse_constraints(("flops<=0.3", "accuracy>=0.5")) == {"flops": 0.3, "accuracy": 0.5}
    with pytest.raises(PolicyError, match="no search-space file or standard-library policy named 'fastvv'"):
        load_space("fastvv")
    with pytest.raises(PolicyError, match="unknown objective 'speed'"):
        search(model, load_space("fastv"), lambda c, p: {}, model_ref="m", objectives=("speed",))
    with pytest.raises(PolicyError, match="the evaluation returned no 'flops'"):
        search(model, load_space("fastv"), lambda c, p: {"accuracy": 1.0}, model_ref="m", n_trials=1,
               storage=sqlite(tmp_path / "e.db"), baseline=False)
    with pytest.raises(PolicyError, match=r"cannot open the search storage postgresql://someone:\*\*\*@127.0.0.1:9/x"):
        search(model, load_space("fastv"), lambda c, p: {}, model_ref="m",
               storage="postgresql://someone:secret@127.0.0.1:9/x")


def completed(storage: str, study: str) -> dict[int, dict]:
    import optuna

    loaded = optuna.load_study(study_name=study, storage=storage)
    return {t.number: {"key": t.user_attrs["key"], "values": t.values, "cached_from": t.user_attrs.get("cached_from")}
            for t in loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}


def search_process(space: Path, out: Path, storage: str, trials: int, seed: int = 0) -> subprocess.Popen:
    command = [sys.executable, "-m", "policyc.cli", "search", "random", f"{space}:both", "--trials", str(trials),
               "--limit", "2", "--batch-size", "2", "--heartbeat", "1", "--seed", str(seed), "--storage", storage,
               "--study", "s", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the search did not get there in time")
        time.sleep(0.5)


def assert_each_policy_measured_once(trials: dict[int, dict]) -> None:
    measured = [t["key"] for t in trials.values() if t["cached_from"] is None]
    assert len(measured) == len(set(measured))
    assert all(trials[t["cached_from"]]["key"] == t["key"] for t in trials.values() if t["cached_from"] is not None)


def test_a_killed_search_resumes_without_losing_or_repeating_trials(tmp_path: Path) -> None:
    space = tmp_path / "space.tokpol"
    space.write_text(SPACE)
    storage = sqlite(tmp_path / "study.db")
    first = search_process(space, tmp_path / "out", storage, trials=8)
    try:
        wait_for(lambda: (tmp_path / "study.db").exists() and len(_safe_completed(storage)) >= 3)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = completed(storage, "s")
    second = search_process(space, tmp_path / "out", storage, trials=8)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    after = completed(storage, "s")
    assert len(after) == 8 and all(after[n] == t for n, t in before.items())  # none lost, none changed
    assert_each_policy_measured_once(after)
    assert "Pareto front" in out and (tmp_path / "out" / "pareto.png").exists()


def _safe_completed(storage: str) -> dict[int, dict]:
    try:
        return completed(storage, "s")
    except Exception:  # the study does not exist yet
        return {}


def test_a_constraint_on_a_figure_that_is_no_objective_keeps_its_own_direction() -> None:
    from policyc.policy_search import SearchResult

    def trial(number: int, accuracy: float, flops: float) -> TrialResult:
        return TrialResult(number, "p", {}, "", f"k{number}", {"accuracy": accuracy, "flops": flops})

    weak, strong = trial(0, 0.1, 0.2), trial(1, 0.9, 0.5)
    result = SearchResult("s", "", {"flops": "minimize"}, {"accuracy": 0.5}, [weak, strong])
    assert not result.feasible(weak) and result.feasible(strong)  # accuracy >= 0.5, though only flops is optimized
    assert result.front == [strong]
